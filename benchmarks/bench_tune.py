"""Does ``tune``'s choice hold on the test? The noise rule vs picking the best setting in-sample.

Simulated embeddings with encounters (``synth.encounter_embeddings``, as in bench_validation.py):
20 identities x 12 encounters x 2 photos; 2 encounters per identity are the test set (new
encounters), and ``tune`` runs on the validation photos of fold 0 of encounter-grouped folds
over the others (~80 photos), the size of validation the issue's real run had per identity.
Two TTA variants are embedded for every photo, the scene (identity + encounter) the same and
the photo noise drawn per view:

- "a flip that helps": ``hflip`` averages two views (less noise), ``none`` is one view;
- "a flip that does not": ``hflip`` is another single view, as good as ``none`` in expectation.

Query expansion and re-ranking are searched as ``tune`` always does (local verification needs
image files: not part of this benchmark). Per seed and case three configs are scored on the
test photos (identity-balanced mAP): plain (every option off), the old rule (the best setting
of the whole grid on all validation photos, what ``tune`` wrote before) and the noise rule (an
option only when its held-out paired-bootstrap gain has its 90% interval above 0).

Each option a rule uses is "right" when switching it off on the test photos loses mAP, "wrong"
otherwise; an option the noise rule keeps off is "kept simpler", a "miss" when the old rule's
config gains from it on test. Writes benchmarks/results/tune.json.

    .venv/bin/python benchmarks/bench_tune.py [--seeds 5]
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
from jaguar_kit.metrics import identity_balanced_map  # noqa: E402
from jaguar_kit.pipeline import Embeddings  # noqa: E402
from jaguar_kit.retrieval import Pipeline  # noqa: E402
from jaguar_kit.tune import TTA_OPTION, tune  # noqa: E402

CASES = {"a flip that helps": 2, "a flip that does not": 1}  # views averaged by "hflip"
WORLD = dict(identities=20, encounters=12, per_encounter=2, context=1.0, noise=0.0)
NOISE = 1.0  # per-view photo noise (sd)
TEST_ENCOUNTERS = 2


def views(clean: np.ndarray, n_views: int, rng: np.random.Generator) -> np.ndarray:
    return (clean + NOISE * rng.normal(size=(n_views, *clean.shape)).mean(axis=0)).astype(np.float32)


def test_map(variants: dict, tta: str, steps, y) -> float:
    return identity_balanced_map(Pipeline(tuple(steps)).run(variants[tta]), y).map


def without(tta: str, steps, option: str) -> tuple[str, tuple]:
    if option == TTA_OPTION:
        return "none", tuple(steps)
    return tta, tuple(s.off() if s.name == option else s for s in steps)


def uses(tta: str, steps, option: str) -> bool:
    return tta != "none" if option == TTA_OPTION else any(s.name == option and s.active for s in steps)


def run_seed(hflip_views: int, seed: int) -> dict:
    clean, ids, enc = encounter_embeddings(seed=seed, **WORLD)
    rng = np.random.default_rng(seed + 1000)
    emb = {"none": views(clean, 1, rng), "hflip": views(clean, hflip_views, rng)}
    test = np.array([int(e.split("-")[1]) >= WORLD["encounters"] - TEST_ENCOUNTERS for e in enc])
    rest = np.flatnonzero(~test)
    _, va = split_indices(make_folds(ids[rest], 5, seed, groups=enc[rest]), 0)
    val = rest[va]
    names = [f"p{i:04d}" for i in range(len(ids))]
    variants = {t: [Embeddings([names[i] for i in val], e[val])] for t, e in emb.items()}
    result = tune(variants, {names[i]: ids[i] for i in val}, progress=False)

    tv, ty = {t: [e[test]] for t, e in emb.items()}, ids[test]
    old = result.in_sample_best
    configs = {"plain": ("none", tuple(s.off() for s in result.steps)), "old rule": (old.variant, old.steps),
               "noise rule": (result.tta, result.steps)}
    out = {"test_map": {k: test_map(tv, t, s, ty) for k, (t, s) in configs.items()}, "options": {}}
    for option, d in result.decisions.items():
        gain = {}
        for rule in ("old rule", "noise rule"):
            t, s = configs[rule]
            gain[rule] = (out["test_map"][rule] - test_map(tv, *without(t, s, option), ty)) if uses(t, s, option) \
                else None
        out["options"][option] = {"noise_rule_uses": uses(*configs["noise rule"], option),
                                  "old_rule_uses": uses(*configs["old rule"], option),
                                  "test_gain": gain, "heldout": [d["heldout_gain"], *d["interval"]]}
    return out


def summarise(runs: list[dict]) -> dict:
    n = len(runs)
    tm = {k: [r["test_map"][k] for r in runs] for k in runs[0]["test_map"]}
    at_least = lambda other: sum(a >= b - 1e-12 for a, b in zip(tm["noise rule"], tm[other]))  # noqa: E731
    out = {"test_map_mean": {k: round(float(np.mean(v)), 4) for k, v in tm.items()},
           "noise_rule_at_least_old_rule_on_test": f"{at_least('old rule')}/{n}",
           "noise_rule_at_least_plain_on_test": f"{at_least('plain')}/{n}", "options": {}}
    for option in runs[0]["options"]:
        rows = [r["options"][option] for r in runs]
        s = {}
        for rule, key in (("old rule", "old_rule_uses"), ("noise rule", "noise_rule_uses")):
            used = [r for r in rows if r[key]]
            s[rule] = {"used": f"{len(used)}/{n}", "right": sum(r["test_gain"][rule] > 0 for r in used),
                       "wrong": sum(r["test_gain"][rule] <= 0 for r in used)}
        kept = [r for r in rows if not r["noise_rule_uses"]]
        s["noise rule"]["kept_simpler"] = len(kept)
        s["noise rule"]["missed"] = sum(r["old_rule_uses"] and r["test_gain"]["old rule"] > 0 for r in kept)
        s["noise rule"]["right_or_kept_simpler"] = f"{n - s['noise rule']['wrong']}/{n}"
        s["old rule"]["right_or_off"] = f"{n - s['old rule']['wrong']}/{n}"
        out["options"][option] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = {name: [run_seed(v, seed) for seed in range(args.seeds)] for name, v in CASES.items()}
    report = {
        "benchmark": "tune: options chosen by the noise rule vs the best setting in-sample, scored on test",
        "setup": {**{k: v for k, v in WORLD.items() if k != "noise"}, "photo_noise": NOISE,
                  "test_encounters_per_identity": TEST_ENCOUNTERS, "validation": "fold 0 of 5 encounter-grouped folds",
                  "cases": {k: f"hflip averages {v} view(s)" for k, v in CASES.items()}, "seeds": args.seeds,
                  "rule": "option used only when the 90% paired-bootstrap interval of its held-out gain is above 0"},
        "results": {name: summarise(r) for name, r in runs.items()},
        "per_seed": runs,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": platform.platform(),
    }
    text = json.dumps(report, indent=2, default=float) + "\n"
    atomic_write_text(ROOT / "benchmarks" / "results" / "tune.json", text)
    print(json.dumps(report["results"], indent=2), f"\n{report['seconds']} s")


if __name__ == "__main__":
    main()
