"""Small-data fine-tuning remedies against the frozen backbone (CPU, a few minutes each).

Few images per identity is where fine-tuning overfits and can end below the frozen
pretrained backbone. Each variant trains efficientnet-lite0 (real ImageNet weights) on the
same synthetic competition with few views per jaguar, picks its best epoch on the
validation fold, and is scored on the synthetic test set (never used for choosing), beside
the frozen backbone's own features on the same images:

- the demo's rate (lr 1e-3) and the kit's default rate (lr 5e-5, head x10);
- head warm-up (``train.head_epochs``: a linear probe, then fine-tune all);
- weight averaging (``train.ema_decay``);
- no augmentation.

    .venv/bin/python benchmarks/bench_finetune.py [--epochs 6] [--only NAME ...]
    # -> benchmarks/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.config import Config, apply_overrides  # noqa: E402
from jaguar_kit.data.synth import generate_competition  # noqa: E402
from jaguar_kit.pipeline import embed_split, read_labels, score  # noqa: E402
from jaguar_kit.train.engine import train  # noqa: E402

BASE = ["model.backbone=efficientnet-lite0", "model.weights=auto", "data.prepared_size=256", "data.workers=0",
        "train.device=cpu", "train.p=8", "train.k=4", "train.patience=0", "train.warmup_epochs=1",
        "embed.tta=none", "embed.batch_size=32", "retrieval.rerank=false"]
VARIANTS = {
    "demo rate (lr 1e-3)": ["train.lr=1e-3"],
    "default rate (lr 5e-5)": ["train.lr=5e-5"],
    "lr 1e-3 + head warm-up 2 epochs": ["train.lr=1e-3", "train.head_epochs=2"],
    "lr 1e-3 + EMA 0.99": ["train.lr=1e-3", "train.ema_decay=0.99"],
    "lr 1e-3, no augmentation": ["train.lr=1e-3", "train.augment=none"],
    "lr 5e-5 + head warm-up 2 epochs": ["train.lr=5e-5", "train.head_epochs=2"],
    "lr 5e-5 + EMA 0.99": ["train.lr=5e-5", "train.ema_decay=0.99"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jk-finetune-"))
    # 8 views per jaguar (6 to train on after the validation fold): the small-data regime
    data = generate_competition(work / "data", identities=30, images_per_identity=8, test_per_identity=3, size=256,
                                seed=1, progress=False)
    test_labels = read_labels(data / "solution.csv")
    results: dict = {"data": "synthetic, 30 jaguars x 8 views (+3 test views each), 256 px", "epochs": args.epochs,
                     "backbone": "efficientnet-lite0 (ImageNet weights)", "variants": {}}
    cfg0 = apply_overrides(Config(), BASE)
    frozen_test = score([embed_split("frozen:efficientnet-lite0", data, "test", work / "cache", work / "prepared", cfg0,
                                     progress=False)], test_labels, cfg0.retrieval)["raw"]
    results["frozen_test_map"] = round(frozen_test["map"], 4)
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        cfg = apply_overrides(Config(), [*BASE, *overrides, f"train.epochs={args.epochs}"])
        t = time.perf_counter()
        run = train(cfg, data, work / name.replace(" ", "_"), prepared_root=work / "prepared", progress=False,
                    resume_roots=[])
        test = score([embed_split(run.best_checkpoint, data, "test", work / "cache", work / "prepared", cfg,
                                  progress=False)], test_labels, cfg.retrieval)["raw"]
        val_curve = [round(r["val_map"], 4) for r in run.history]
        results["variants"][name] = {
            "overrides": overrides, "frozen_val_map": round(run.frozen_map, 4), "best_val_map": round(run.best_map, 4),
            "val_map_by_epoch_from_0": val_curve, "test_map": round(test["map"], 4),
            "test_vs_frozen": round(test["map"] - frozen_test["map"], 4), "seconds": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results["variants"][name]), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
