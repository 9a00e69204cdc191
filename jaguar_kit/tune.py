"""``jaguar-kit tune``: the retrieval settings chosen on validation, with an honest estimate.

Re-ranking moved the leaderboard by +0.01 to +0.02 in one round of the competition and by
-0.025 on another's validation; flips help or hurt depending on the species. So nothing
here is assumed: on validation embeddings (and labels), a grid of TTA setting x query
expansion k x re-ranking (off, or k1, k2, lambda with a raw/re-ranked blend) is scored
with the competition's identity-balanced mAP, then, when the validation images are given,
local-feature verification is calibrated (:mod:`jaguar_kit.fusion`) and its fusion weight
chosen the same way.

Picking the best of ~1,000 settings on one set overstates its gain (the winner is partly
luck). The validation identities are therefore split in two halves; settings chosen on
one half are scored on the other, both ways round, and that held-out gain is what the
report states. The halves split identities, not images: each half keeps every image of its
identities, so neighbourhood sizes (QE k, k1, k2) are tuned with as many true matches per
query as the full set has. The written config is then chosen on all validation images.

Outputs (``write_outputs``): ``tuned.json`` -- a partial config (``embed.tta`` and the whole
``retrieval`` section) that ``jaguar-kit submit --config tuned.json`` reads --,
``tune_table.csv`` (every setting scored on the full validation set, the table the choice
was made from) and ``tune_report.json`` (the held-out check and the calibration).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .config import RetrievalConfig
from .errors import JaguarKitError
from .metrics import identity_balanced_map

TTA_ORDER = ("none", "hflip", "flip4")  # cheapest first: ties go to the cheaper setting


@dataclass
class TuneGrid:
    """The candidate values; the first of each is the simplest (preferred on ties)."""

    query_expansion_k: tuple[int, ...] = (0, 1, 2, 3)
    k1: tuple[int, ...] = (5, 10, 20)
    k2: tuple[int, ...] = (1, 3, 6)
    lambda_value: tuple[float, ...] = (0.1, 0.3, 0.6)
    rerank_blend: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    local_weight: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    local_k: int = 20


@dataclass
class TuneResult:
    tta: str
    retrieval: RetrievalConfig
    table: pd.DataFrame  # every setting scored on the full validation set
    heldout: dict  # choose on one half, score on the other
    calibration_quality: dict | None = None
    baselines: dict = field(default_factory=dict)

    def config_dict(self) -> dict:
        """The partial config ``jaguar-kit submit --config`` reads."""
        return {"embed": {"tta": self.tta}, "retrieval": dataclasses.asdict(self.retrieval)}


# ----------------------------------------------------------------------------- scoring


def _labels_array(labels: Sequence) -> np.ndarray:
    return np.asarray([str(x) for x in labels], dtype=object)


def _score(sim: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    r = identity_balanced_map(sim, y)
    return r.map, r.rank1


def _cosine_after_qe(models: Sequence[np.ndarray], qe_k: int, alpha: float) -> np.ndarray:
    """Per model QE then cosine, averaged over models: exactly what final_similarity does."""
    from .retrieval import cosine_similarity, query_expansion

    total = None
    for e in models:
        if qe_k > 0:
            e = query_expansion(e, qe_k, alpha)
        s = cosine_similarity(e)
        total = s if total is None else total + s
    return (total / len(models)).astype(np.float32)


def _global_settings(grid: TuneGrid, n: int):
    """(qe_k, rerank, k1, k2, lambda, blend) candidates valid for a set of n images."""
    for qe in grid.query_expansion_k:
        if qe >= n:
            continue
        yield qe, False, 0, 0, 0.0, 0.0
        for k1 in grid.k1:
            for k2 in grid.k2:
                for lam in grid.lambda_value:
                    for b in grid.rerank_blend:
                        yield qe, True, k1, k2, lam, b


def global_table(variants: Mapping[str, Sequence[np.ndarray]], y: np.ndarray, grid: TuneGrid,
                 alpha: float = 3.0, progress: bool = False, desc: str = "tune") -> pd.DataFrame:
    """mAP and rank-1 of every (TTA, QE, re-ranking) setting on one set of images."""
    from .retrieval import k_reciprocal_rerank

    n = len(y)
    rows = []
    settings = list(_global_settings(grid, n))
    bar = tqdm(total=len(variants) * len(settings), desc=desc, disable=not progress, leave=False)
    for tta, models in variants.items():
        for qe in grid.query_expansion_k:
            if qe >= n:
                continue
            cos = _cosine_after_qe(models, qe, alpha)
            dist_cache: dict[tuple, np.ndarray] = {}
            for q, rerank, k1, k2, lam, b in settings:
                if q != qe:
                    continue
                if not rerank:
                    sim = cos
                else:
                    key = (k1, k2, lam)
                    if key not in dist_cache:
                        dist_cache[key] = k_reciprocal_rerank(cos, k1, k2, lam, is_similarity=True)
                    sim = ((1.0 - b) * cos + b * (1.0 - dist_cache[key])).astype(np.float32)
                m, r1 = _score(sim, y)
                rows.append({"tta": tta, "query_expansion_k": qe, "rerank": rerank, "k1": k1, "k2": k2,
                             "lambda_value": lam, "rerank_blend": b, "map": m, "rank1": r1})
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def _complexity(row: Mapping) -> tuple:
    """Simpler settings first: cheaper TTA, no QE, no re-ranking, smaller neighbourhoods."""
    return (TTA_ORDER.index(row["tta"]) if row["tta"] in TTA_ORDER else 9, row["query_expansion_k"],
            bool(row["rerank"]), row["k1"], row["k2"], row["lambda_value"], row["rerank_blend"])


def best_row(table: pd.DataFrame) -> dict:
    """The highest mAP; ties (within 1e-9) go to higher rank-1, then to the simplest setting."""
    top = table["map"].max()
    cands = [r for r in table.to_dict("records") if r["map"] >= top - 1e-9]
    return max(cands, key=lambda r: (r["rank1"], tuple(-np.array(_complexity(r), dtype=float))))


def _apply_row(base: RetrievalConfig, row: Mapping) -> RetrievalConfig:
    cfg = copy.deepcopy(base)
    cfg.query_expansion_k = int(row["query_expansion_k"])
    cfg.rerank = bool(row["rerank"])
    if cfg.rerank:
        cfg.k1, cfg.k2 = int(row["k1"]), int(row["k2"])
        cfg.lambda_value, cfg.rerank_blend = float(row["lambda_value"]), float(row["rerank_blend"])
    return cfg


def _similarity(models: Sequence[np.ndarray], cfg: RetrievalConfig) -> np.ndarray:
    from .retrieval import final_similarity

    return final_similarity(list(models), cfg)


# ----------------------------------------------------------------------------- local stage


@dataclass
class _LocalContext:
    features: dict  # name -> ImageFeatures
    matcher: object
    memo: dict = field(default_factory=dict)  # (name, name) -> MatchScore, shared by every call


def _local_scores(sim: np.ndarray, names: Sequence[str], ctx: _LocalContext, k: int, progress: bool):
    from .local import verify_shortlist

    return verify_shortlist(sim, [ctx.features[n] for n in names], k, ctx.matcher, progress=progress,
                            memo=ctx.memo, keys=list(names))


def _pair_arrays(sim, scores, y):
    rows = np.arange(len(y))[:, None]
    return sim[rows, scores.index], y[rows] == y[scores.index]


def _local_choice(sim, names, y, ctx, grid, progress):
    """Fit the calibration on this set's shortlist pairs and pick the fusion weight here."""
    from .fusion import fit_calibration, fuse_shortlist

    scores = _local_scores(sim, names, ctx, grid.local_k, progress)
    g, same = _pair_arrays(sim, scores, y)
    cal = fit_calibration(g, same, scores.inliers, scores.ratio)
    rows = []
    for w in grid.local_weight:
        fused = sim if w == 0 else fuse_shortlist(sim, scores, dataclasses.replace(cal, local_weight=w))
        m, r1 = _score(fused, y)
        rows.append({"local_weight": w, "map": m, "rank1": r1})
    best = max(rows, key=lambda r: (r["map"], r["rank1"], -r["local_weight"]))
    return cal, best["local_weight"], rows


# ----------------------------------------------------------------------------- the search


def split_identities(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of two halves of the identities (alternating over a seeded shuffle,
    larger identities first so both halves get a similar number of images)."""
    ids, counts = np.unique(y, return_counts=True)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(ids)), -counts))
    half_a = set(ids[order[0::2]])
    a = np.array([v in half_a for v in y])
    return a, ~a


def _choose(variants, y, names, base, grid, ctx, progress, desc):
    """Everything chosen on one set: (tta, RetrievalConfig, table, local rows or None)."""
    table = global_table(variants, y, grid, base.query_expansion_alpha, progress, desc)
    row = best_row(table)
    cfg = _apply_row(base, row)
    cfg.local_verify = False
    local_rows = None
    if ctx is not None:
        sim = _similarity(variants[row["tta"]], cfg)
        cal, w, local_rows = _local_choice(sim, names, y, ctx, grid, progress)
        cfg = cal.to_config(cfg)
        cfg.local_weight = float(w)
        cfg.local_verify = w > 0
        cfg.local_k = grid.local_k
    return row["tta"], cfg, table, local_rows


def _evaluate(variants, tta, cfg, y, names, ctx, progress) -> tuple[float, float]:
    """mAP and rank-1 of a finished choice (including local fusion) on a set of images."""
    from .fusion import Calibration, fuse_shortlist

    sim = _similarity(variants[tta], cfg)
    if cfg.local_verify:
        if ctx is None:
            raise JaguarKitError("tune: local verification needs the validation images (--data)")
        scores = _local_scores(sim, names, ctx, cfg.local_k, progress)
        sim = fuse_shortlist(sim, scores, Calibration.from_config(cfg))
    return _score(sim, y)


def tune(
    variants: Mapping[str, Sequence["object"]],
    labels: Mapping[str, str],
    base: RetrievalConfig | None = None,
    image_paths: Mapping[str, str | Path] | None = None,
    local_cache: str | Path | None = None,
    grid: TuneGrid | None = None,
    base_tta: str | None = None,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> TuneResult:
    """Choose TTA, QE, re-ranking, blend (and the local fusion) on validation embeddings.

    ``variants``: TTA name -> the validation :class:`~jaguar_kit.pipeline.Embeddings` of each
    model of the ensemble (one entry per TTA setting that was embedded). ``labels``:
    filename -> identity. ``image_paths`` (filename -> source image) turns on the local
    stage, its features cached in ``local_cache``. ``base`` supplies every setting not
    searched; ``base_tta`` names the TTA the caller would use untuned (the "given" baseline).
    """
    grid = grid or TuneGrid()
    base = copy.deepcopy(base or RetrievalConfig())
    if not variants:
        raise JaguarKitError("tune: no validation embeddings given")
    unknown = [t for t in variants if t not in TTA_ORDER]
    if unknown:
        raise JaguarKitError(f"tune: unknown TTA setting {unknown[0]!r} (expected one of {', '.join(TTA_ORDER)})")
    first = next(iter(variants.values()))[0]
    names = [n for n in first.names if n in labels]
    if len(names) < 4:
        raise JaguarKitError(f"tune: only {len(names)} of the {len(first.names)} embedded images have labels")
    arrays = {}
    for tta, sets in variants.items():
        if len(sets) != len(next(iter(variants.values()))):
            raise JaguarKitError(f"tune: TTA {tta!r} has {len(sets)} models, others have "
                                 f"{len(next(iter(variants.values())))}")
        arrays[tta] = [s.subset(names).vectors for s in sets]
    y = _labels_array([labels[n] for n in names])
    if (pd.Series(y).value_counts() > 1).sum() < 4:
        raise JaguarKitError("tune: needs at least 4 identities with two or more validation images")

    ctx = None
    if image_paths is not None:
        from .local import LocalSettings, SiftMatcher, compute_local_features

        missing = [n for n in names if n not in image_paths]
        if missing:
            raise JaguarKitError(f"tune: no image for {missing[0]} (and {len(missing) - 1} more)")
        if local_cache is None:
            raise JaguarKitError("tune: local verification needs a cache folder for its features")
        settings = LocalSettings.from_config(base)
        feats = compute_local_features(names, [image_paths[n] for n in names], local_cache, settings,
                                       workers=workers, progress=progress)
        ctx = _LocalContext(dict(zip(feats.names, feats.features)), SiftMatcher(settings))

    def subset(mask):
        return {t: [a[mask] for a in models] for t, models in arrays.items()}, y[mask], [n for n, m in
                                                                                      zip(names, mask) if m]

    plain_tta = "none" if "none" in arrays else next(iter(arrays))
    given_tta = base_tta if base_tta in arrays else plain_tta
    plain = dataclasses.replace(base, query_expansion_k=0, rerank=False, local_verify=False)
    given = dataclasses.replace(base, local_verify=False)

    # Held-out estimate: choose on one half of the identities, score on the other, both ways.
    half_a, half_b = split_identities(y, seed)
    swaps = []
    for tune_mask, test_mask, tag in ((half_a, half_b, "A->B"), (half_b, half_a, "B->A")):
        tv, ty, tn = subset(tune_mask)
        ev, ey, en = subset(test_mask)
        tta, cfg, table, local_rows = _choose(tv, ty, tn, base, grid, ctx, progress, f"tune on half {tag[0]}")
        best_on_tune = max(r["map"] for r in local_rows) if local_rows else float(best_row(table)["map"])
        chosen = _evaluate(ev, tta, cfg, ey, en, ctx, progress)
        swaps.append({
            "swap": tag, "tune_images": int(tune_mask.sum()), "test_images": int(test_mask.sum()),
            "chosen": _describe(tta, cfg),
            "tuned_map_on_tune_half": best_on_tune,  # in-sample: what picking the best looked like
            "chosen_map": chosen[0], "chosen_rank1": chosen[1],
            "plain_map": _evaluate(ev, plain_tta, plain, ey, en, None, False)[0],
            "given_map": _evaluate(ev, given_tta, given, ey, en, None, False)[0],
        })
    heldout = {
        "protocol": "settings chosen on one half of the validation identities, scored on the other half",
        "swaps": swaps,
        "mean_chosen_map": float(np.mean([s["chosen_map"] for s in swaps])),
        "mean_plain_map": float(np.mean([s["plain_map"] for s in swaps])),
        "mean_given_map": float(np.mean([s["given_map"] for s in swaps])),
    }
    heldout["gain_over_plain"] = heldout["mean_chosen_map"] - heldout["mean_plain_map"]
    heldout["gain_over_given"] = heldout["mean_chosen_map"] - heldout["mean_given_map"]

    # The config to use: everything chosen on the full validation set.
    tta, cfg, table, local_rows = _choose(arrays, y, names, base, grid, ctx, progress, "tune on all")
    table = table.assign(local_weight=0.0)
    quality = None
    if local_rows is not None:
        from .fusion import Calibration, calibration_quality

        chosen_row = best_row(table.drop(columns="local_weight"))
        extra = pd.DataFrame([{**{k: chosen_row[k] for k in chosen_row if k not in ("map", "rank1")}, **r}
                              for r in local_rows if r["local_weight"] != 0])
        table = pd.concat([table, extra], ignore_index=True)
        sim = _similarity(arrays[tta], dataclasses.replace(cfg, local_verify=False))
        scores = _local_scores(sim, names, ctx, grid.local_k, False)
        g, same = _pair_arrays(sim, scores, y)
        cal = dataclasses.replace(Calibration.from_config(cfg), local_weight=1.0)
        quality = calibration_quality(cal.probability(g, scores.inliers, scores.ratio), same)
        quality["note"] = "in-sample, on the full validation shortlist pairs (local_weight 1)"
    baselines = {
        "plain": {"tta": plain_tta, "map": _evaluate(arrays, plain_tta, plain, y, names, None, False)[0]},
        "given": {"tta": given_tta, "map": _evaluate(arrays, given_tta, given, y, names, None, False)[0]},
        "chosen": {"tta": tta, "map": _evaluate(arrays, tta, cfg, y, names, ctx, False)[0],
                   "note": "in-sample: the held-out figures are the honest ones"},
    }
    return TuneResult(tta, cfg, table.sort_values("map", ascending=False, kind="stable").reset_index(drop=True),
                      heldout, quality, baselines)


def _describe(tta: str, cfg: RetrievalConfig) -> dict:
    d = {"tta": tta, "query_expansion_k": cfg.query_expansion_k, "rerank": cfg.rerank}
    if cfg.rerank:
        d.update(k1=cfg.k1, k2=cfg.k2, lambda_value=cfg.lambda_value, rerank_blend=cfg.rerank_blend)
    d["local_verify"] = cfg.local_verify
    if cfg.local_verify:
        d.update(local_k=cfg.local_k, local_weight=cfg.local_weight)
    return d


def write_outputs(result: TuneResult, out_dir: str | Path) -> dict[str, Path]:
    """``tuned.json`` (the config), ``tune_table.csv`` and ``tune_report.json`` in ``out_dir``."""
    from .files import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"config": out / "tuned.json", "table": out / "tune_table.csv", "report": out / "tune_report.json"}
    atomic_write_text(paths["table"], result.table.to_csv(index=False))
    report = {"chosen": _describe(result.tta, result.retrieval), "heldout": result.heldout,
              "validation_in_sample": result.baselines, "calibration": result.calibration_quality,
              "table": paths["table"].name, "top_settings": result.table.head(10).to_dict("records")}
    atomic_write_text(paths["report"], json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(paths["config"], json.dumps(result.config_dict(), indent=2) + "\n")
    return paths


def summary(result: TuneResult) -> str:
    h = result.heldout
    lines = [f"chosen: {json.dumps(_describe(result.tta, result.retrieval))}",
             f"held-out (choose on half the identities, score on the other, both ways): mAP "
             f"{h['mean_chosen_map']:.4f} vs plain {h['mean_plain_map']:.4f} ({h['gain_over_plain']:+.4f}) "
             f"vs given settings {h['mean_given_map']:.4f} ({h['gain_over_given']:+.4f})"]
    if result.calibration_quality:
        q = result.calibration_quality
        lines.append(f"fusion calibration: log-loss {q['log_loss']:.3f}, Brier {q['brier']:.3f}, ECE {q['ece']:.3f} "
                     f"on {q['pairs']} shortlist pairs")
    return "\n".join(lines)


__all__ = ["TuneGrid", "TuneResult", "tune", "global_table", "best_row", "split_identities", "write_outputs",
           "summary"]
