"""Does validation predict the test? Random vs encounter-grouped folds, and the fine-tuned-vs-frozen rule.

Simulated embeddings with encounters (``synth.encounter_embeddings``: a photo is its
identity's direction + its encounter's context + noise), so many seeds run in seconds:

- "frozen": the vectors themselves;
- "fine-tuned": a tiny trained model, a ridge classifier fitted on the fold's training
  photos, its class scores as the embedding. It learns whatever separates the training
  identities, the scenes of their encounters included, as a fine-tuned network does; its
  ridge penalty sets how much it can memorise.

Each identity has 12 encounters of 2 photos; 2 encounters per identity are the test set (new
encounters, as on a real test set), the other 10 are split into 5 folds, validated on fold 0
with folds made per image ("random") or per encounter ("grouped"). Two cases:
- "fine-tuning learns the scenes": strong scenes (context sd 1.3, noise 0.6) and a model free
  to memorise (penalty 1): it loses on test, and frozen should be kept;
- "fine-tuning learns the coat": weak scenes (context sd 0.3, noise 1.2) and a regularised
  model (penalty 300, close to projecting onto the class means): it wins on test.

Reported per fold scheme: validation minus test mAP for both models, how often the test
mAP lies inside the validation mAP's 90% bootstrap interval, and how often each rule picks
the model that is better on test:
- "means": fine-tuned if its validation mean is higher (the rule before);
- "paired": fine-tuned only if the paired bootstrap over identities of (fine-tuned - frozen)
  has its 90% interval above 0, else frozen (``train.checkpoint.fine_tuning_verdict``).
A rule that keeps frozen where fine-tuned is better on test by less than the noise is a miss.
Writes benchmarks/results/validation.json.

    .venv/bin/python benchmarks/bench_validation.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaguar_kit.data.folds import make_folds, split_indices  # noqa: E402
from jaguar_kit.data.synth import encounter_embeddings  # noqa: E402
from jaguar_kit.files import atomic_write_text  # noqa: E402
from jaguar_kit.metrics import bootstrap_interval, identity_balanced_map, paired_difference  # noqa: E402

CASES = {  # (simulated photos, ridge penalty of the "fine-tuned" model)
    "fine-tuning learns the scenes": (dict(context=1.3, noise=0.6), 1.0),
    "fine-tuning learns the coat": (dict(context=0.3, noise=1.2), 300.0),
}
TEST_ENCOUNTERS = 2


def ridge_model(x: np.ndarray, y: np.ndarray, penalty: float):
    """Fit the tiny 'fine-tuned' model on (x, y); returns the embedding function."""
    classes, codes = np.unique(y, return_inverse=True)
    w = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ np.eye(len(classes))[codes])
    return lambda v: v @ w


def score(x: np.ndarray, labels: np.ndarray):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return identity_balanced_map(x @ x.T, labels)


def run_seed(world: dict, penalty: float, seed: int) -> dict:
    x, ids, enc = encounter_embeddings(identities=20, encounters=12, per_encounter=2, seed=seed, **world)
    test = np.array([int(e.split("-")[1]) >= 12 - TEST_ENCOUNTERS for e in enc])
    xt, it, et = x[~test], ids[~test], enc[~test]
    out = {}
    for scheme, groups in (("random", None), ("grouped", et)):
        tr, va = split_indices(make_folds(it, 5, seed, groups=groups), 0)
        tuned = ridge_model(xt[tr], it[tr], penalty)
        val = {"frozen": score(xt[va], it[va]), "fine-tuned": score(tuned(xt[va]), it[va])}
        tst = {"frozen": score(x[test], ids[test]).map, "fine-tuned": score(tuned(x[test]), ids[test]).map}
        row = {}
        for model in val:
            per_id = val[model].per_identity["map"].to_numpy()
            lo, hi = bootstrap_interval(per_id)
            row[model] = {"val": val[model].map, "test": tst[model], "inside": bool(lo <= tst[model] <= hi)}
        d = paired_difference(val["fine-tuned"].per_identity["map"], val["frozen"].per_identity["map"])
        better = "fine-tuned" if tst["fine-tuned"] > tst["frozen"] else "frozen"
        row["choice"] = {
            "better_on_test": better,
            "means": "fine-tuned" if val["fine-tuned"].map > val["frozen"].map else "frozen",
            "paired": "fine-tuned" if d.clears_noise else "frozen",
        }
        out[scheme] = row
    return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for scheme in ("random", "grouped"):
        rows = [r[scheme] for r in runs]
        s = {}
        for model in ("frozen", "fine-tuned"):
            gap = np.array([r[model]["val"] - r[model]["test"] for r in rows])
            s[model] = {"val_minus_test_mean": round(float(gap.mean()), 4),
                        "val_minus_test_range": [round(float(gap.min()), 4), round(float(gap.max()), 4)],
                        "test_inside_val_interval": f"{sum(r[model]['inside'] for r in rows)}/{len(rows)}"}
        for rule in ("means", "paired"):
            right = sum(r["choice"][rule] == r["choice"]["better_on_test"] for r in rows)
            s[f"rule_{rule}_right"] = f"{right}/{len(rows)}"
        s["fine_tuned_better_on_test"] = f"{sum(r['choice']['better_on_test'] == 'fine-tuned' for r in rows)}/{len(rows)}"
        out[scheme] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = {name: summarise([run_seed(world, penalty, seed) for seed in range(args.seeds)])
               for name, (world, penalty) in CASES.items()}
    report = {
        "benchmark": "validation vs test: random vs encounter-grouped folds, fine-tuned vs frozen rules",
        "setup": {"identities": 20, "encounters_per_identity": 12, "photos_per_encounter": 2,
                  "test_encounters_per_identity": TEST_ENCOUNTERS, "folds": 5, "validated_fold": 0,
                  "seeds": args.seeds, "cases": {k: {"photos": w, "ridge_penalty": p} for k, (w, p) in CASES.items()},
                  "interval": "90% percentile bootstrap over identities"},
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": platform.platform(),
    }
    text = json.dumps(report, indent=2) + "\n"
    atomic_write_text(ROOT / "benchmarks" / "results" / "validation.json", text)
    print(text)


if __name__ == "__main__":
    main()
