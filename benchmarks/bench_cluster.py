"""Grouping unlabelled photos: average linkage at its calibrated cut vs single linkage (the baseline).

Synthetic embeddings (unit vectors around one random centre per individual, 10 photos each,
noise from easy to hard): the first 20 individuals form the catalogue, which calibrates each
method's cut at a 5% pairwise false-merge target; the other 20, never seen, are grouped.
Baseline: single linkage (connected components) at the catalogue's identify threshold, what
jaguar_kit did before. Figures: pairwise precision (pairs put together that are one animal),
pairwise recall, and the number of groups (20 is right). Writes benchmarks/results/cluster.json.

    .venv/bin/python benchmarks/bench_cluster.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from photo_layouts import gaussian_embeddings  # noqa: E402

from jaguar_kit.files import atomic_write_text  # noqa: E402
from jaguar_kit.photos.calibration import calibrate  # noqa: E402
from jaguar_kit.photos.cluster import group_photos, linkage_threshold, pairwise_agreement  # noqa: E402

NOISES = (0.8, 1.1, 1.4)
SEEDS = range(5)


def main() -> None:
    rows = []
    for noise in NOISES:
        for seed in SEEDS:
            x, y = gaussian_embeddings(n_ids=40, per=10, dim=48, noise=noise, seed=seed)
            ids = np.array(y)
            known = np.isin(ids, [f"id{i:03d}" for i in range(20)])
            q, truth = x[~known], ids[~known]
            cat_x, cat_ids = x[known], list(ids[known])
            t_single = calibrate(cat_x, cat_ids).threshold
            t_average = linkage_threshold(cat_x, cat_ids, 0.05, "average")
            rows.append({"noise": noise, "seed": seed,
                         "single_at_identify_threshold": {"threshold": round(t_single, 4),
                                                          **pairwise_agreement(group_photos(q, t_single, "single"), truth)},
                         "average_at_calibrated_cut": {"threshold": round(t_average, 4),
                                                       **pairwise_agreement(group_photos(q, t_average, "average"), truth)}})
    summary = {}
    for noise in NOISES:
        sub = [r for r in rows if r["noise"] == noise]
        summary[str(noise)] = {m: {k: round(float(np.mean([r[m][k] for r in sub])), 3)
                                   for k in ("pair_precision", "pair_recall", "groups")}
                               for m in ("single_at_identify_threshold", "average_at_calibrated_cut")}
    out = {"what": "pairwise precision/recall of grouping 20 unseen individuals (10 photos each), mean over seeds",
           "seeds": len(SEEDS), "target_false_merge": 0.05, "by_noise": summary, "runs": rows}
    atomic_write_text(ROOT / "benchmarks" / "results" / "cluster.json", json.dumps(out, indent=1) + "\n")
    for noise, s in summary.items():
        print(f"noise {noise}: single P={s['single_at_identify_threshold']['pair_precision']:.2f} "
              f"R={s['single_at_identify_threshold']['pair_recall']:.2f} | average "
              f"P={s['average_at_calibrated_cut']['pair_precision']:.2f} R={s['average_at_calibrated_cut']['pair_recall']:.2f}")


if __name__ == "__main__":
    main()
