"""Own-photo identification on synthetic jaguars with identities held out as new.

The demo's synthetic competition (30 jaguars, 16 views each, 384 px). 30% of the jaguars are
held out entirely ("new individuals"); of each other jaguar half the photos form the catalogue
and half are queries. The catalogue is calibrated on itself (leave-one-identity-out) for a 5%
false-merge target; the queries then give top-1/top-5 of known jaguars, the AUROC of known vs.
new, and the realised false-merge and false-split rates on the held-out jaguars. Index and
identify are timed end to end (decode, prepare, embed, score) on this CPU.

    .venv/bin/python benchmarks/bench_catalogue.py [--finetune-minutes 4]   # -> benchmarks/results/catalogue.json

``--finetune-minutes`` also fine-tunes the demo's recipe on the catalogue jaguars only (the
held-out ones stay unseen, as new animals are in the field) and measures that model too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.photos.catalogue import build_catalogue
from jaguar_kit.photos.evaluate import evaluate_open_set, open_set_split
from jaguar_kit.photos.identify import identify
from jaguar_kit.photos.model import load_model
from jaguar_kit.photos.cluster import group_photos, linkage_threshold, pairwise_agreement
from jaguar_kit.data.synth import generate_competition
from jaguar_kit.metrics import open_set_scores
from jaguar_kit.photos.inputs import read_photos

SEEDS = 10  # splits for the spread of the realised false-merge rate (embeddings reused)


def finetune(data: Path, known: set[str], out: Path, minutes: float) -> Path:
    """The demo's recipe trained on the known jaguars only; returns best.pt (or last.pt)."""
    from jaguar_kit.demo import demo_config
    from jaguar_kit.train.engine import train

    sub = out / "known-only"
    sub.mkdir(parents=True, exist_ok=True)
    rows = [r for r in csv.DictReader(open(data / "train.csv")) if r["ground_truth"] in known]
    with open(sub / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filename", "ground_truth"])
        w.writeheader()
        w.writerows(rows)
    if not (sub / "train").exists():
        os.symlink((data / "train").resolve(), sub / "train")
    cfg = demo_config(["data.split=stratified", "data.fold=0"])
    cfg.train.time_budget_h = minutes / 60
    run = train(cfg, sub, out / "run", prepared_root=out / "prepared", progress=False)
    return Path(run.best_checkpoint)


def measure(source: str, photos, split, out: Path) -> dict:
    cat_rows, known_rows, new_rows = split
    model = load_model(source, device="cpu", prepared_size=320)
    t = time.perf_counter()
    cat = build_catalogue([photos[i] for i in cat_rows], model, out / "catalogue", progress=False)
    index_s = time.perf_counter() - t
    q = list(known_rows) + list(new_rows)
    t = time.perf_counter()
    res = identify(cat, [photos[i] for i in q], model=model, cache_dir=out / "queries", progress=False)
    identify_s = time.perf_counter() - t
    truth = [photos[i].identity for i in q]
    f = open_set_scores(res.top_ids, res.top_scores, truth, set(cat.identities), cat.calibration.threshold)
    # clustering the queries at the catalogue's calibrated linking cut
    from jaguar_kit.photos.model import embed_photos

    _, emb, _ = embed_photos(model, [photos[i] for i in q], out / "queries", progress=False)
    agree = pairwise_agreement(group_photos(emb, linkage_threshold(cat.embeddings, cat.identities)), truth)
    # the spread over other splits (same embeddings of all photos)
    _, all_emb, _ = embed_photos(model, photos, out / "all", progress=False)
    ids = [p.identity for p in photos]
    runs = [evaluate_open_set(all_emb, ids, new_share=0.3, seed=s) for s in range(SEEDS)]
    spread = {k: [round(r[k], 4) for r in runs] for k in ("false_merge", "false_split", "top1_known", "auroc_known_vs_new")}
    return {
        "model": source,
        "catalogue": {"photos": len(cat), "individuals": len(cat.individuals),
                      "threshold": round(cat.calibration.threshold, 4),
                      "probability_threshold": round(cat.calibration.probability_threshold, 4),
                      "estimated_on_catalogue": {k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in cat.calibration.estimated.items()},
                      "warnings": cat.warnings},
        "queries": {"known": f["known_queries"], "new": f["new_queries"]},
        **{k: round(v, 4) for k, v in f.items() if isinstance(v, float)},
        "target_false_merge": 0.05,
        "clustering_queries_at_threshold": agree,
        "index_photos_per_s": round(len(cat) / index_s, 2),
        "identify_photos_per_s": round(len(q) / identify_s, 2),
        f"over_{SEEDS}_splits": {k: {"mean": round(float(np.mean(v)), 4), "min": min(v), "max": max(v)}
                                 for k, v in spread.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_catalogue")
    ap.add_argument("--finetune-minutes", type=float, default=0)
    ap.add_argument("--keep-frozen", action="store_true", help="reuse the frozen figures already in the results file")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    data = generate_competition(work / "data", identities=30, images_per_identity=16, test_per_identity=3, size=384,
                                seed=0, progress=False)
    photos = read_photos(data, need_identity=True)
    split = open_set_split([p.identity for p in photos], new_share=0.3, query_share=0.5, seed=0)
    out = REPO / "benchmarks" / "results" / "catalogue.json"
    previous = json.loads(out.read_text()) if args.keep_frozen and out.is_file() else {}
    result = {
        "what": "synthetic competition (30 jaguars x 16 views, 384 px); 30% of jaguars held out as new, half of each "
                "other jaguar's photos indexed, the rest queries; calibration target: 5% false merges",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "frozen": previous.get("frozen") or measure("frozen:efficientnet-lite0", photos, split, work / "frozen"),
    }
    if args.finetune_minutes > 0:
        known = {photos[i].identity for i in split[0]}
        ckpt = finetune(data, known, work / "finetune", args.finetune_minutes)
        result["finetuned_on_known_only"] = measure(str(ckpt), photos, split, work / "tuned")
        result["finetuned_on_known_only"]["training_minutes"] = args.finetune_minutes
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
