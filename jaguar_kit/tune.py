"""``jaguar-kit tune``: the retrieval settings chosen on validation, with an honest estimate.

Re-ranking moved the leaderboard by +0.01 to +0.02 in one round of the competition and by
-0.025 on another's validation; flips help or hurt depending on the species. So nothing
here is assumed: on validation embeddings (and labels), a grid of TTA setting x query
expansion k x re-ranking (off, or k1, k2, lambda with a raw/re-ranked blend) is scored
with the competition's identity-balanced mAP, then, when the validation images are given,
local-feature verification is calibrated (:mod:`jaguar_kit.retrieval.fusion`) and its fusion
weight chosen the same way. The settings and their candidate values are the retrieval
steps' own (:mod:`jaguar_kit.retrieval`), scored by :func:`jaguar_kit.retrieval.search.search`
through the same steps a submission runs.

Picking the best of ~1,000 settings on one set overstates its gain (the winner is partly
luck). The validation identities are therefore split in two halves; settings chosen on
one half are scored on the other, both ways round, and that held-out gain is what the
report states. The halves split identities, not images: each half keeps every image of its
identities, so neighbourhood sizes (QE k, k1, k2) are tuned with as many true matches per
query as the full set has.

An option (a TTA other than the cheapest, query expansion, re-ranking, local verification)
is used only when the held-out evidence clears its noise. The rule: on each held-out half,
the per-identity AP of the setting chosen on the other half is compared with the same
setting with that option switched off (TTA: the cheapest one); the two halves together
score every identity once, and the option is allowed only when the 90% paired-bootstrap
interval over identities of that difference (:func:`jaguar_kit.metrics.paired_difference`)
lies above 0. An option the other half did not choose differs by 0 there. Otherwise the
simpler choice stands, and the report and ``tuned.json`` (under ``"_why"``) say why, with
the difference and its interval. The written config is then chosen on all validation
images among the allowed options only.

Cross-validation folds (:func:`tune_folds`, ``jaguar-kit tune --folds RUN``): each fold's
validation images come with its own model's embeddings, so every setting is scored within each
fold and the per-identity APs are pooled over the folds (an identity validated by several folds
averages its queries from all of them); the halves, the rule and the choice then run on the
pooled scores, resting on every fold's identities (``evidence`` says how many).

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
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .config import RetrievalConfig
from .errors import JaguarKitError
from .files import atomic_write_text
from .metrics import Difference, RetrievalScore, identity_balanced_map, paired_difference, pooled_score
from .retrieval.pipeline import Pipeline
from .retrieval.search import Part, Scored, search_parts
from .retrieval.step import Context, Step, start
from .retrieval.verify import LocalVerification

TTA_ORDER = ("none", "hflip", "flip4")  # cheapest first: ties go to the cheaper setting


class TuneGrid:
    """Values to try, by step parameter, replacing that step's own search space.

    A sequence is searched (its first value is the simplest, preferred on ties); a single
    value fixes the setting, e.g. ``TuneGrid(k1=(5, 10), local_k=10)``.
    """

    def __init__(self, **values: Any):
        self.values = values

    def apply(self, steps: Sequence[Step]) -> tuple[tuple[Step, ...], dict[str, tuple]]:
        """(steps with the fixed values set, the searched values); an unknown name is refused."""
        owners = {f.name: i for i, s in enumerate(steps) for f in dataclasses.fields(s)}
        unknown = [k for k in self.values if k not in owners]
        if unknown:
            raise JaguarKitError(f"tune: no retrieval step has a setting {unknown[0]!r}")
        steps = list(steps)
        searched = {}
        for k, v in self.values.items():
            if isinstance(v, (tuple, list)):
                if k not in steps[owners[k]].space:
                    raise JaguarKitError(f"tune: {k!r} is not searched by its step ({steps[owners[k]].name})")
                searched[k] = tuple(v)
            else:
                steps[owners[k]] = steps[owners[k]].with_settings(**{k: v})
        return tuple(steps), searched


@dataclass
class TuneResult:
    tta: str
    retrieval: RetrievalConfig
    table: pd.DataFrame  # every setting scored on the full validation set
    heldout: dict  # choose on one half, score on the other
    calibration_quality: dict | None = None
    baselines: dict = field(default_factory=dict)
    steps: tuple[Step, ...] = ()  # the chosen pipeline (steps the config has no fields for included)
    reports: dict = field(default_factory=dict)  # step name -> what its fit reports (in-sample)
    decisions: dict = field(default_factory=dict)  # option -> its held-out evidence and whether it is used
    in_sample_best: Scored | None = None  # the best of every setting on all images, options unchecked
    evidence: dict = field(default_factory=dict)  # what the choice rests on: folds, identities, images

    def config_dict(self) -> dict:
        """The partial config ``jaguar-kit submit --config`` reads."""
        return {"embed": {"tta": self.tta}, "retrieval": dataclasses.asdict(self.retrieval)}


def split_identities(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of two halves of the identities (alternating over a seeded shuffle,
    larger identities first so both halves get a similar number of images)."""
    ids, counts = np.unique(y, return_counts=True)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(ids)), -counts))
    half_a = set(ids[order[0::2]])
    a = np.array([v in half_a for v in y])
    return a, ~a


def _score(parts: Sequence[Part], tta: str, steps: Sequence[Step]) -> RetrievalScore:
    """The score (per identity too) of a finished choice, each part scored within itself, pooled."""
    return pooled_score([identity_balanced_map(Pipeline(tuple(steps)).run(p.variants[tta], p.ctx), p.labels)
                         for p in parts])


def _evaluate(parts: Sequence[Part], tta: str, steps: Sequence[Step]) -> tuple[float, float]:
    """mAP and rank-1 of a finished choice."""
    r = _score(parts, tta, steps)
    return r.map, r.rank1


TTA_OPTION = "tta"


def _options(steps: Sequence[Step], space: Mapping[str, tuple], searched: Sequence[bool], n: int,
             variants: Sequence[str]) -> list[str]:
    """The options the search can switch on and off: TTA when several are given, and each step whose
    candidates include it both active and not (the similarity itself cannot be off)."""
    out = [TTA_OPTION] if len(variants) > 1 else []
    for s, on in zip(steps, searched):
        if on and {s.with_settings(**c).active for c in s.candidates(space, n)} == {True, False}:
            out.append(s.name)
    return out


def _uses(choice: Scored, option: str, plain_tta: str) -> bool:
    if option == TTA_OPTION:
        return choice.variant != plain_tta
    return any(s.name == option and s.active for s in choice.steps)


def _without(choice: Scored, option: str, plain_tta: str) -> tuple[str, tuple[Step, ...]]:
    """(TTA, steps) of ``choice`` with ``option`` switched off: the simpler choice it is compared with."""
    if option == TTA_OPTION:
        return plain_tta, choice.steps
    return choice.variant, tuple(s.off() if s.name == option else s for s in choice.steps)


def _decision(option: str, d: Difference, chosen_on: int, halves: int) -> dict:
    """What the report and ``tuned.json`` say of one option."""
    allowed = bool(d.clears_noise)
    if chosen_on == 0:
        why = "not chosen on either held-out half: off (the simpler choice)"
    elif allowed:
        why = f"held-out gain {d} clears the noise (interval above 0): allowed"
    else:
        why = (f"held-out gain {d} does not clear the noise (interval not above 0): off, the simpler "
               f"choice stands")
    return {"option": option, "allowed": allowed, "chosen_on_halves": f"{chosen_on}/{halves}",
            "heldout_gain": d.mean, "interval": [d.low, d.high], "level": d.level, "identities": d.n_identities,
            "why": why}


def _describe(tta: str, steps: Sequence[Step]) -> dict:
    d = {"tta": tta}
    for s in steps:
        d.update(s.describe())
    return d


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
    steps: Sequence[Step] | None = None,
) -> TuneResult:
    """Choose TTA and every retrieval step's setting (local fusion included) on validation embeddings.

    ``variants``: TTA name -> the validation :class:`~jaguar_kit.pipeline.Embeddings` of each
    model of the ensemble (one entry per TTA setting that was embedded). ``labels``:
    filename -> identity. ``image_paths`` (filename -> source image) turns on the steps that
    look at images (local verification), their features cached in ``local_cache``. ``base``
    supplies every setting not searched; ``base_tta`` names the TTA the caller would use
    untuned (the "given" baseline). ``steps``: the pipeline to tune (default: ``base``'s).
    """
    return tune_folds({"validation": variants}, labels, base, image_paths, local_cache, grid, base_tta, seed, workers,
                      progress, steps)


def _parts(folds: Mapping[str, Mapping[str, Sequence]], labels: Mapping[str, str]) -> list[Part]:
    """Each fold's labelled images and their embeddings by TTA (cheapest first), checked."""
    if not folds or not all(folds.values()):
        raise JaguarKitError("tune: no validation embeddings given")
    ttas = list(next(iter(folds.values())))
    parts = []
    for fold, variants in folds.items():
        where = f"tune: {fold}: " if len(folds) > 1 else "tune: "
        unknown = [t for t in variants if t not in TTA_ORDER]
        if unknown:
            raise JaguarKitError(f"{where}unknown TTA setting {unknown[0]!r} (expected one of {', '.join(TTA_ORDER)})")
        if set(variants) != set(ttas):
            raise JaguarKitError(f"{where}TTA settings {sorted(variants)}, the first fold has {sorted(ttas)}")
        first = next(iter(variants.values()))[0]
        names = [n for n in first.names if n in labels]
        if len(names) < 4:
            raise JaguarKitError(f"{where}only {len(names)} of the {len(first.names)} embedded images have labels")
        n_models = len(next(iter(variants.values())))
        arrays = {}
        for tta in sorted(variants, key=TTA_ORDER.index):  # cheapest first: ties go to the cheaper TTA
            if len(variants[tta]) != n_models:
                raise JaguarKitError(f"{where}TTA {tta!r} has {len(variants[tta])} models, others have {n_models}")
            arrays[tta] = [s.subset(names).vectors for s in variants[tta]]
        y = np.asarray([str(labels[n]) for n in names], dtype=object)
        if len(folds) > 1 and not (pd.Series(y).value_counts() > 1).any():
            raise JaguarKitError(f"{where}no identity has two or more validation images")
        parts.append(Part(arrays, y, Context(names)))
    repeated = {i for p in parts for i, c in pd.Series(p.labels).value_counts().items() if c > 1}
    if len(repeated) < 4:
        raise JaguarKitError("tune: needs at least 4 identities with two or more validation images")
    return parts


def tune_folds(
    folds: Mapping[str, Mapping[str, Sequence["object"]]],
    labels: Mapping[str, str],
    base: RetrievalConfig | None = None,
    image_paths: Mapping[str, str | Path] | None = None,
    local_cache: str | Path | None = None,
    grid: TuneGrid | None = None,
    base_tta: str | None = None,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    steps: Sequence[Step] | None = None,
) -> TuneResult:
    """:func:`tune` on several validation sets at once: ``folds`` maps a fold's name to its ``variants``.

    Cross-validation folds each validate on their own images with their own model, so a fold's
    embeddings are compared only among themselves: every setting is scored within each fold and
    the per-identity APs are pooled over the folds (:func:`~jaguar_kit.metrics.pooled_score`) before
    the held-out halves, the noise rule and the choice, which then rest on every fold's identities.
    Steps fitted on labels (local verification's calibration) would be fitted per fold, with no one
    fit to write: with several folds they stay off.
    """
    base = copy.deepcopy(base or RetrievalConfig())
    parts = _parts(folds, labels)
    notes = []
    if image_paths is not None and len(parts) > 1:
        notes.append("local verification: not tuned across folds (its calibration is fitted within one fold); "
                     "tune it on one fold's embeddings with --embeddings and --data")
        image_paths = None
    parts = [dataclasses.replace(p, ctx=Context(p.ctx.names, image_paths, local_cache, workers, progress))
             for p in parts]
    y = np.concatenate([p.labels for p in parts])

    given_steps = Pipeline.from_config(base).steps if steps is None else tuple(steps)
    tuned, space = (grid or TuneGrid()).apply(given_steps)
    if image_paths is None:  # nothing to look at: steps that need images stay off
        tuned = tuple(s.off() if s.needs_images else s for s in tuned)
    searched = [image_paths is not None or not s.needs_images for s in tuned]
    for p in parts:
        for s, on in zip(tuned, searched):
            if on:
                s.prepare(p.ctx)  # e.g. local features of every image, once (the halves reuse them)
    ends = np.cumsum([len(p.labels) for p in parts])[:-1]

    def subset(mask) -> list[Part]:
        """Each fold's images in ``mask`` (over the folds' images in order); a fold left with no match is left out."""
        out = []
        for p, m in zip(parts, np.split(mask, ends)):
            if (pd.Series(p.labels[m]).value_counts() > 1).any():
                names = [n for n, keep in zip(p.ctx.names, m) if keep]
                out.append(Part({t: [a[m] for a in models] for t, models in p.variants.items()}, p.labels[m],
                                dataclasses.replace(p.ctx, names=names)))  # the same memo: matches are made once
        if not out:
            raise JaguarKitError("tune: half of the identities has no two images in any one fold: too few to tune on")
        return out

    def choose(pp, desc) -> tuple[Scored, list[Scored]]:
        return search_parts(pp, tuned, space, searched, progress, desc)

    ttas = list(parts[0].variants)
    plain_tta = "none" if "none" in ttas else ttas[0]
    given_tta = base_tta if base_tta in ttas else plain_tta
    plain = tuple(s.off() for s in given_steps)
    given = Pipeline(given_steps).without_images().steps

    # Held-out estimate: choose on one half of the identities, score on the other, both ways.
    # Each option is also scored switched off on the held-out half: the paired evidence for it.
    half_a, half_b = split_identities(y, seed)
    options = _options(tuned, space, searched, min(len(p.labels) for p in parts), ttas)
    with_option: dict[str, list] = {o: [] for o in options}
    without_option: dict[str, list] = {o: [] for o in options}
    chosen_on = dict.fromkeys(options, 0)
    swaps = []
    for tune_mask, test_mask, tag in ((half_a, half_b, "A->B"), (half_b, half_a, "B->A")):
        tp, ep = subset(tune_mask), subset(test_mask)
        chosen, _ = choose(tp, f"tune on half {tag[0]}")
        held = _score(ep, chosen.variant, chosen.steps)
        m, r1 = held.map, held.rank1
        for o in options:
            used = _uses(chosen, o, plain_tta)
            chosen_on[o] += used
            simpler = _score(ep, *_without(chosen, o, plain_tta)) if used else held
            with_option[o].append(held.per_identity["map"].to_numpy())
            without_option[o].append(simpler.per_identity["map"].to_numpy())
        swaps.append({
            "swap": tag, "tune_images": int(tune_mask.sum()), "test_images": int(test_mask.sum()),
            "chosen": _describe(chosen.variant, chosen.steps),
            "tuned_map_on_tune_half": chosen.map,  # in-sample: what picking the best looked like
            "chosen_map": m, "chosen_rank1": r1,
            "plain_map": _evaluate(ep, plain_tta, plain)[0],
            "given_map": _evaluate(ep, given_tta, given)[0],
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

    decisions = {o: _decision(o, paired_difference(np.concatenate(with_option[o]), np.concatenate(without_option[o]),
                                                   seed=seed), chosen_on[o], len(swaps)) for o in options}
    off = {o for o, d in decisions.items() if not d["allowed"]}

    # The config to use: chosen on the full validation set among the allowed options.
    chosen, scored = choose(parts, "tune on all")
    in_sample_best = chosen
    if any(_uses(chosen, o, plain_tta) for o in off):
        kept = [dataclasses.replace(p, variants={t: a for t, a in p.variants.items()
                                                 if TTA_OPTION not in off or t == plain_tta}) for p in parts]
        narrowed = tuple(s.off() if s.name in off else s for s in tuned)
        only = [on and s.name not in off for s, on in zip(tuned, searched)]
        chosen, more = search_parts(kept, narrowed, space, only, progress, "tune on all, allowed options")
        seen = {tuple(s.row().items()) for s in scored}
        scored = scored + [s for s in more if tuple(s.row().items()) not in seen]
    for o, d in decisions.items():
        d["used"] = _uses(chosen, o, plain_tta)
    reports = {}
    if len(parts) == 1:  # with several folds the fitted steps are off (see above)
        p = parts[0]
        for step, state in Pipeline(chosen.steps).states(start(p.variants[chosen.variant], p.ctx)):
            report = step.report(state, p.labels) if step is not None else None
            if report is not None:
                reports[step.name] = report
    plain_score = _score(parts, plain_tta, plain)
    baselines = {
        "plain": {"tta": plain_tta, "map": plain_score.map},
        "given": {"tta": given_tta, "map": _evaluate(parts, given_tta, given)[0]},
        "chosen": {"tta": chosen.variant, "map": chosen.map,
                   "note": "in-sample: the held-out figures are the honest ones"},
    }
    allowed = [not any(_uses(s, o, plain_tta) for o in off) for s in scored]
    evidence = {"folds": len(parts), "identities": int((plain_score.per_identity["n_queries"] > 0).sum()),
                "images": len(y),
                "per_fold": [{"fold": f, "images": len(p.labels), "identities": int(pd.Series(p.labels).nunique())}
                             for f, p in zip(folds, parts)],
                "notes": notes}
    return TuneResult(chosen.variant, Pipeline(chosen.steps).to_config(base), _table(scored, tuned, allowed),
                      heldout, reports.get(LocalVerification.name), baselines, chosen.steps, reports, decisions,
                      in_sample_best, evidence)


def _table(scored: Sequence[Scored], steps: Sequence[Step], allowed: Sequence[bool]) -> pd.DataFrame:
    """Every setting scored, best first; columns: tta, the steps' parameters in pipeline order, map, rank1,
    allowed (whether it uses only options that cleared the held-out noise: the choice is the best of those)."""
    rows = [{**s.row(), "allowed": a} for s, a in zip(scored, allowed)]
    table = pd.DataFrame(rows)
    params = [f.name for s in steps for f in dataclasses.fields(s) if f.name in table]
    table = table[["tta", *params, "map", "rank1", "allowed"]]
    for c in params:  # a setting a row does not use (k1 with re-ranking off) is blank, integers stay integers
        if all(isinstance(r[c], int) and not isinstance(r[c], bool) for r in rows if c in r):
            table[c] = table[c].astype("Int64")
    return table.sort_values("map", ascending=False, kind="stable").reset_index(drop=True)


def write_outputs(result: TuneResult, out_dir: str | Path) -> dict[str, Path]:
    """``tuned.json`` (the config), ``tune_table.csv`` and ``tune_report.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"config": out / "tuned.json", "table": out / "tune_table.csv", "report": out / "tune_report.json"}
    atomic_write_text(paths["table"], result.table.to_csv(index=False))
    report = {"chosen": _describe(result.tta, result.steps), "evidence": result.evidence, "decisions": result.decisions,
              "heldout": result.heldout,
              "validation_in_sample": result.baselines, "calibration": result.calibration_quality,
              "fitted_steps": result.reports, "table": paths["table"].name,
              "top_settings": [{k: v for k, v in r.items() if not pd.isna(v)} for r in result.table.head(10).to_dict("records")]}
    atomic_write_text(paths["report"], json.dumps(report, indent=2, default=float) + "\n")
    why = {o: d["why"] for o, d in result.decisions.items()}  # "_" keys are notes the config loader skips
    rests_on = {k: result.evidence[k] for k in ("folds", "identities", "images") if k in result.evidence}
    atomic_write_text(paths["config"], json.dumps({**result.config_dict(), "_why": why, "_evidence": rests_on},
                                                  indent=2) + "\n")
    return paths


def summary(result: TuneResult) -> str:
    h = result.heldout
    lines = [f"chosen: {json.dumps(_describe(result.tta, result.steps))}",
             f"held-out (choose on half the identities, score on the other, both ways): mAP "
             f"{h['mean_chosen_map']:.4f} vs plain {h['mean_plain_map']:.4f} ({h['gain_over_plain']:+.4f}) "
             f"vs given settings {h['mean_given_map']:.4f} ({h['gain_over_given']:+.4f})"]
    lines += [f"{o}: {d['why']}" for o, d in result.decisions.items()]
    e = result.evidence
    if e.get("folds", 1) > 1:
        lines.append(f"evidence: {e['folds']} folds, {e['identities']} identities, {e['images']} validation images "
                     "(each fold scored in its own model's embeddings, per-identity APs pooled)")
    lines += [f"note: {n}" for n in e.get("notes", ())]
    if result.calibration_quality:
        q = result.calibration_quality
        lines.append(f"fusion calibration: log-loss {q['log_loss']:.3f}, Brier {q['brier']:.3f}, ECE {q['ece']:.3f} "
                     f"on {q['pairs']} shortlist pairs")
    return "\n".join(lines)


__all__ = ["TTA_ORDER", "TuneGrid", "TuneResult", "tune", "tune_folds", "split_identities", "write_outputs", "summary"]
