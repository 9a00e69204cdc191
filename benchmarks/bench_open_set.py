"""Own photos, open set: frozen vs. fine-tuned, by the global score alone vs. with the coat pattern.

The demo's synthetic jaguars (`jaguar-kit synth` defaults as the demo draws them: 30 jaguars,
16 views each, 384 px). For each split (seed) 30% of the jaguars are held out entirely as new
individuals; of each other jaguar half the photos form the catalogue and half are queries. A
model is fine-tuned on the catalogue's photos only (the demo's recipe, efficientnet-lite0, 6 epochs
whatever they take: the held-out jaguars stay unseen, as new animals are in the field). Each model indexes the
catalogue with coat-pattern evidence on (`index --coat on`); the catalogue's own leave-out
calibration then gives one decision by the global score alone and one fused with the coat
pattern, both at a 5% false-merge target. Per combination: top-1/top-5 of known photos, AUROC
known vs. new, the share of known photos decided correctly, the realised false-merge rate, the
share of known photos called new, and identify throughput (photos/s, this CPU, end to end).

    .venv/bin/python benchmarks/bench_open_set.py [--seeds 3]   # -> benchmarks/results/open_set.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.data.synth import generate_competition  # noqa: E402
from jaguar_kit.demo import demo_config, own_photos_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="splits (which jaguars are new)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_open_set_"))
    data = work / "data"
    if not (data / "train.csv").is_file():
        generate_competition(data, identities=30, images_per_identity=16, test_per_identity=3, size=384, seed=0,
                             progress=False)
    cfg = demo_config()
    runs = []
    for seed in range(args.seeds):
        t = time.monotonic()
        figures = own_photos_step(data, work / f"split{seed}", cfg, work / "prepared", time.monotonic() + 3600,
                                  progress=False, seed=seed, train_seconds=3600)
        figures["seconds"] = round(time.monotonic() - t, 1)
        runs.append(figures)
        print(f"split {seed}: {json.dumps(figures)}", flush=True)
    table = {}
    for model in ("frozen", "finetuned"):
        for evidence in runs[0][model]:
            if not isinstance(runs[0][model][evidence], dict):
                continue
            per = [r[model][evidence] for r in runs]
            table[f"{model} / {evidence}"] = {
                k: {"mean": round(float(np.mean([p[k] for p in per])), 4),
                    "min": round(float(np.min([p[k] for p in per])), 4),
                    "max": round(float(np.max([p[k] for p in per])), 4)} for k in per[0]}
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "splits": args.seeds,
        "target_false_merge": runs[0]["frozen"]["target_false_merge"],
        "table": table,
        "runs": runs,
    }
    out = REPO / "benchmarks" / "results" / "open_set.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name:45s} " + "  ".join(f"{k} {v['mean']:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
