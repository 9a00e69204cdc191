"""Scores of photos against individuals, and the calibrated `new`-individual decision.

**Scores.** A photo's score against an individual is its best cosine similarity to any of
that individual's catalogue photos (one good view of the same flank is what identifies a
jaguar; a mean over all photos would punish individuals photographed from both sides).

**Calibration** (:func:`calibrate`), on the catalogue alone, by holding identities out:
every identity in turn is removed from the catalogue (leave-one-identity-out: the limit of
leave-some-identities-out folds, and exact here because removing an identity only removes
columns of the photo x individual score matrix) and its photos are scored against the
others as "new individuals"; every photo is also scored against its own individual without
itself, as a "known" photo. The threshold is the best-match score that new-individual photos
exceed at the target false-merge rate (default 5%: the share of photos of an unseen animal
that would be attached to a known one). A logistic fit of score -> "this candidate is the
right individual" over each photo's top candidates (known and new cases weighted equally)
turns scores into probabilities; the threshold is stored as both a score and a probability.
Individuals that may be one animal under two names are found before, on similarities
(:func:`suspected_duplicates`), and kept out of the fit.

**Coat-pattern evidence** (:mod:`.coat`), where the catalogue has it, joins the same fit: the
probability is ``sigmoid(a * score + c * log(1 + inliers) + b)`` over both numbers, fitted on
the same held-out cases (each photo's inliers against every individual with itself and its
encounter left out, and with its individual left out), and the decision compares that logit
with a threshold set, as before, on the new-individual cases at the target rate. One
calibration, so the false-merge target holds for the fused decision, and the words follow
its probability.

**Words** (:func:`decision_words`): a decision is said in the band of its probability
(:data:`BANDS`), and :func:`calibration_banner` says when the catalogue's own calibration
shows that the model cannot tell its individuals apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import JaguarKitError
from ..logistic import fit_logistic, sigmoid
from ..metrics import auroc
from .coat import CoatHoldOut

DEFAULT_TARGET_FMR = 0.05
FIT_TOP_K = 5  # candidates per photo used to fit the probabilities (what a person is shown)
MIN_IDENTITIES = 3  # to calibrate: at least this many individuals, some with 2+ photos
MIN_AUROC = 0.7  # below: the model does not separate the catalogue's individuals (calibration_banner)


def individual_scores(sim: np.ndarray, codes: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Best similarity of each row to each individual, and the column (photo) that gave it.

    ``sim`` (Q, N) similarities to catalogue photos whose individuals are ``codes`` (N,);
    returns ``(scores (Q, I), best photo index (Q, I))``; ``-inf`` where an individual has no
    usable photo (e.g. masked out with -inf).
    """
    q = sim.shape[0]
    scores = np.full((q, n_ids), -np.inf, dtype=np.float64)
    best = np.full((q, n_ids), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_ids + 1))
    for i in range(n_ids):
        cols = order[bounds[i]:bounds[i + 1]]
        if len(cols):
            block = sim[:, cols]
            j = block.argmax(axis=1)
            scores[:, i] = block[np.arange(q), j]
            best[:, i] = cols[j]
    return scores, best


def threshold_for_rate(new_scores: np.ndarray, target: float) -> float:
    """The lowest score threshold at which at most ``target`` of ``new_scores`` reach it (>=)."""
    v = np.sort(np.asarray(new_scores, np.float64))[::-1]
    v = v[np.isfinite(v)]
    if not len(v):
        return float("-inf")
    allowed = int(np.floor(target * len(v) + 1e-9))
    if allowed >= len(v):
        return float(v[-1])
    if allowed == 0:
        return float(np.nextafter(v[0], np.inf))
    return float((v[allowed] + v[allowed - 1]) / 2) if v[allowed] < v[allowed - 1] else float(np.nextafter(v[allowed], np.inf))


@dataclass
class Calibration:
    """The `new`-individual decision and the score -> probability map of a catalogue."""

    threshold: float  # best-match score at or above which a photo is attached to a known individual
    probability_threshold: float  # the same threshold as a probability
    a: float  # P = sigmoid(a * score + b)
    b: float
    target_false_merge: float
    estimated: dict = field(default_factory=dict)  # rates on the catalogue itself (leave-one-identity-out)
    method: str = "leave-one-identity-out"
    excluded: list = field(default_factory=list)  # individuals kept out of the fit (suspected duplicates)
    coat: float = 0.0  # weight of log(1 + coat-pattern inliers) in the logit; 0: the global score alone

    @property
    def uses_coat(self) -> bool:
        return self.coat > 0

    def statistic(self, scores, inliers=None) -> np.ndarray:
        """What the threshold is compared with: the best-match score, or with coat-pattern evidence the
        fitted logit over both (candidates are ranked by it too)."""
        scores = np.asarray(scores, np.float64)
        if not self.uses_coat:
            return scores
        absent = ~np.isfinite(scores)  # an individual left out (or without photos) is never a candidate
        z = self.a * np.where(absent, 0.0, scores) + self.coat * np.log1p(np.asarray(inliers, np.float64)) + self.b
        return np.where(absent, -np.inf, z)

    def probability(self, scores, inliers=None) -> np.ndarray:
        if self.uses_coat:
            return sigmoid(self.statistic(scores, inliers))
        return sigmoid(self.a * np.asarray(scores, np.float64) + self.b)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("threshold", "probability_threshold", "a", "b", "target_false_merge",
                                              "estimated", "method", "excluded", "coat")}

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration | None:
        return None if not d else cls(**d)


@dataclass
class HoldOut:
    """Leave-one-identity-out scores of catalogue photos (what calibration learns from)."""

    scores: np.ndarray  # (N, I) best match per individual, the photo itself excluded
    own: np.ndarray  # (N,) score against its own individual (-inf: its only photo)
    new_top: np.ndarray  # (N,) best score when its individual is absent
    new_arg: np.ndarray  # (N,) which individual that best score belongs to


def hold_out_scores(embeddings: np.ndarray, codes: np.ndarray, n_ids: int,
                    encounters: Sequence[str] | None = None) -> HoldOut:
    """Leave-out scores; a photo is never scored against itself, nor against another photo of its
    own encounter (``encounters``, "" unknown): a burst shows the same scene, not a second
    sighting, and would make known photos look easier than a new sighting of that animal is."""
    sim = embeddings @ embeddings.T
    np.fill_diagonal(sim, -np.inf)
    if encounters is not None:
        enc = np.asarray(["" if e is None else str(e) for e in encounters], dtype=object)
        same = (enc[:, None] == enc[None, :]) & (enc[:, None] != "") & (codes[:, None] == codes[None, :])
        sim[same] = -np.inf
    scores, _ = individual_scores(sim, codes, n_ids)
    rows = np.arange(len(codes))
    own = scores[rows, codes].copy()
    others = scores.copy()
    others[rows, codes] = -np.inf
    new_arg = others.argmax(axis=1)
    return HoldOut(scores, own, others[rows, new_arg], new_arg)


def calibrate(embeddings: np.ndarray, identities: Sequence[str], target_false_merge: float = DEFAULT_TARGET_FMR,
              hold: HoldOut | None = None, coat: CoatHoldOut | None = None,
              encounters: Sequence[str] | None = None) -> Calibration:
    """Fit the threshold and the probabilities on a catalogue (see the module docstring); with
    ``coat`` (its leave-out coat-pattern inliers) over the global score and the inliers together."""
    if not 0 < target_false_merge < 1:
        raise JaguarKitError(f"target false-merge rate must be between 0 and 1, got {target_false_merge}")
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    n_ids = len(uniques)
    h = hold or hold_out_scores(embeddings, codes, n_ids, encounters)
    known = np.isfinite(h.own)
    if n_ids < MIN_IDENTITIES or known.sum() < 2:
        raise JaguarKitError(
            f"catalogue: {n_ids} individuals, {int(known.sum())} photos with another photo of the same individual; "
            f"calibrating the `new` decision needs at least {MIN_IDENTITIES} individuals and some with 2+ photos"
        )
    rows = np.arange(len(codes))
    kn = np.flatnonzero(known)
    others = h.scores.copy()
    others[rows, codes] = -np.inf
    zeros = np.zeros(h.scores.shape, np.int64)
    known_inl, new_inl = (coat.known, coat.new.copy()) if coat is not None else (zeros, zeros.copy())
    new_inl[rows, codes] = 0
    # Probability fit: each photo once as a known individual (its candidates, the right one labelled
    # 1) and once as a new one (its candidates among the others, all 0); the candidates are the top
    # ones by score and, with coat-pattern evidence, every individual it matched.
    cases = ((h.scores[kn], known_inl[kn], codes[kn], 1.0 / max(len(kn), 1)),
             (others, new_inl, np.full(len(codes), -1), 1.0 / len(codes)))
    k = min(FIT_TOP_K, n_ids)
    xs, ys, ws = [], [], []
    for s, inl, right, weight in cases:
        top = np.zeros(s.shape, bool)
        np.put_along_axis(top, np.argsort(-s, axis=1)[:, :k], True, 1)
        pick = (top | (inl > 0)) & np.isfinite(s)
        xs.append(np.stack([s[pick], np.log1p(inl[pick])], axis=1))
        ys.append((np.arange(n_ids)[None, :] == right[:, None])[pick])
        ws.append(np.full(pick.sum(), weight))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    if coat is None:
        x = x[:, :1]
    coef, b = fit_logistic(x, y, sample_weight=w, l2=1e-3, single_class="fit", max_iter=50)
    a, c = float(coef[0]), float(coef[1]) if coat is not None else 0.0
    if c > 0 and a < 0:  # a global score that counts against the match is noise: the inliers alone
        coef, b = fit_logistic(x[:, 1:], y, sample_weight=w, l2=1e-3, single_class="fit", max_iter=50)
        a, c = 0.0, float(coef[0])
    if a <= 0 and c <= 0:  # scores carry no signal here (a model that cannot tell these animals apart): flat
        a, c, b = 0.0, 0.0, float(np.log(max((w * y).sum(), 1e-9) / max((w * (1 - y)).sum(), 1e-9)))
    cal = Calibration(0.0, 0.0, a, float(b), float(target_false_merge), coat=max(c, 0.0))
    known_stat = cal.statistic(h.scores, known_inl)[known]
    new_top = cal.statistic(others, new_inl).max(axis=1)
    t = threshold_for_rate(new_top, target_false_merge)
    top_known = known_stat.max(axis=1)
    right = known_stat.argmax(axis=1) == codes[known]
    cal.threshold = float(t)
    cal.probability_threshold = float(sigmoid(t) if cal.uses_coat else sigmoid(a * t + b))
    cal.estimated = {
        "false_merge": float(np.mean(new_top >= t)),
        "false_split": float(np.mean(top_known < t)),
        "wrong_individual": float(np.mean((top_known >= t) & ~right)),
        "decided_correctly": float(np.mean((top_known >= t) & right)),
        "auroc_known_vs_new": auroc(known_stat[np.arange(len(kn)), codes[known]], new_top),
        "top1_known": float(np.mean(right)),
        "photos": len(codes),
        "known_photos": int(known.sum()),
        "individuals": int(n_ids),
    }
    return cal


# --- what a decision may say ----------------------------------------------------------------------

# Bands of the top candidate's calibrated probability (P that it is the right individual), for a
# photo at or above the threshold; below it the photo is "new". The words say no more than the
# number: "almost certainly" only where fewer than 1 in 20 such calls are wrong, and a call that
# is more likely wrong than right (a catalogue whose threshold sits below p = 0.5) is "doubtful".
BANDS = ((0.95, "almost certainly"), (0.80, "probably"), (0.50, "possibly"), (0.0, "doubtful"))


def decision_band(decision: str, probability: float, cal: Calibration | None) -> str:
    """``almost certainly``, ``probably``, ``possibly``, ``doubtful``, ``new`` or ``uncalibrated``."""
    if cal is None:
        return "uncalibrated"
    if decision == "new":
        return "new"
    return next(word for floor, word in BANDS if probability >= floor)


def decision_words(decision: str, best: str, probability: float, cal: Calibration | None) -> str:
    """The decision in plain words, tied to its probability: what the terminal, the CSV and the page say."""
    band = decision_band(decision, probability, cal)
    if band == "uncalibrated":
        return f"closest: {best} (uncalibrated catalogue, too few individuals: no probability)"
    if band == "new":
        return f"likely new: not in the catalogue (closest {best}, p={probability:.2f})"
    if band == "doubtful":
        return f"doubtful: {best} passes the threshold, but p={probability:.2f} means more likely not {best}"
    return f"{band} {best} (p={probability:.2f})" + ("" if band in ("almost certainly", "probably") else ": check")


# Separability: when the catalogue's own leave-one-identity-out calibration shows that the model
# does not tell these individuals apart, every decision is close to a guess. The rule (any one):
# flat probabilities (the fit found no signal: a <= 0, and no weight on the coat pattern); half or
# more of the known photos called new at the threshold; known-vs-new AUROC below 0.7 (a known
# photo's score against its own individual beats a new one's best score in fewer than 7 of 10 pairs).
MAX_FALSE_SPLIT = 0.5


def calibration_banner(cal: Calibration | None) -> str | None:
    """One line to show above every result when the model cannot separate this catalogue's individuals."""
    if cal is None:
        return None
    e = cal.estimated
    why = []
    if cal.a <= 0 and not cal.uses_coat:  # with coat-pattern evidence the inliers may carry all of it
        why.append("flat probabilities: its scores carry no signal about the individual")
    if e.get("false_split", 0) >= MAX_FALSE_SPLIT:
        why.append(f"{e['false_split']:.0%} of its own known photos are called new")
    if e.get("auroc_known_vs_new", 1) < MIN_AUROC:
        why.append(f"known-vs-new AUROC {e['auroc_known_vs_new']:.2f} (below {MIN_AUROC})")
    if not why:
        return None
    return ("CAUTION: on this catalogue's own photos the model cannot tell its individuals apart (" + "; ".join(why)
            + "): every decision below is close to a guess; check each photo by eye, and index with a model "
            "fine-tuned on jaguars (a training run's best.pt) rather than this one")


@dataclass
class SuspectedDuplicate:
    """Two names that may be one animal (see :func:`suspected_duplicates`)."""

    name: str
    other: str
    hits: int  # photos of ``name`` whose best match, with ``name`` held out, is ``other``
    photos: int  # photos of ``name`` (with a best match among the others)
    similarity: float  # median similarity of those best matches
    same_typical: float  # the catalogue's typical same-individual similarity it was compared with
    excluded: str = ""  # the one of the two kept out of the calibration until resolved

    def message(self) -> str:
        return (f"{self.name} and {self.other} may be the same animal: with {self.name} left out, {self.hits} of its "
                f"{self.photos} photos match {self.other} best, at similarity {self.similarity:.3f} (a typical "
                f"same-individual match in this catalogue: {self.same_typical:.3f}); {self.excluded} is kept out "
                f"of the calibration until you compare them and merge the names, or tell them apart")


DUPLICATE_SHARE = 0.5  # most of A's photos go to B ...
SAME_QUANTILE = 0.5  # ... at a similarity that a typical (median) same-individual best match reaches
DIFFERENT_QUANTILE = 0.9  # ... and 9 in 10 different-individual best matches do not
NEAR_IDENTICAL = 0.99  # or the same pictures (re-saved, resized): a duplicate with any model


def suspected_duplicates(identities: Sequence[str], hold: HoldOut) -> list[SuspectedDuplicate]:
    """Names that may be one animal, found on similarities alone (before any threshold exists).

    Rule: with individual A held out, at least half of A's photos have the same individual B
    as their best match, and the median similarity of those matches reaches both
    - the median of the catalogue's same-individual best matches (each photo's best match
      among the other photos of its own individual): as high as typical same-animal
      similarity, and
    - the 90th percentile of its different-individual best matches (each photo's best match
      among the other individuals): higher than nine in ten pairs of different animals,
    both measured on the individuals other than A and B, where same-individual best matches
    beat different-individual ones with an AUROC of at least ``MIN_AUROC``. Two names of one
    animal look exactly like that; two animals rarely do. A model that does not separate the
    individuals (AUROC below that) cannot tell a duplicate from similarities: none is
    suspected then (the calibration banner says why), except near-identical pictures (median
    similarity ``NEAR_IDENTICAL`` or more: the same photos under two names). A
    threshold fitted with the duplicate inside could not reveal it (its photos, counted as
    "new" while matching a known name, push the threshold up until they are not merged).
    Each pair is reported once; of the two, the name with fewer photos (on a tie, the later
    name) is kept out of the calibration, and a name already kept out is not paired again.
    """
    codes, uniques = pd.factorize(pd.Series(list(identities), dtype=object))
    n_ids = len(uniques)
    counts = np.bincount(codes, minlength=n_ids)
    found = []
    for a in range(n_ids):
        mine = np.flatnonzero((codes == a) & np.isfinite(hold.new_top))
        if not len(mine):
            continue
        hits = np.bincount(hold.new_arg[mine], minlength=n_ids)
        b = int(hits.argmax())
        if hits[b] < max(1, int(np.ceil(DUPLICATE_SHARE * len(mine)))):
            continue
        rest = (codes != a) & (codes != b)
        same, different = hold.own[rest & np.isfinite(hold.own)], hold.new_top[rest & np.isfinite(hold.new_top)]
        sim = float(np.median(hold.new_top[mine][hold.new_arg[mine] == b]))
        typical = float(np.quantile(same, SAME_QUANTILE)) if len(same) else float("nan")
        known_typical = len(same) >= 3 and len(different) >= 3 and auroc(same, different) >= MIN_AUROC
        if sim >= NEAR_IDENTICAL or (known_typical and sim >= typical
                                     and sim >= np.quantile(different, DIFFERENT_QUANTILE)):
            found.append(SuspectedDuplicate(str(uniques[a]), str(uniques[b]), int(hits[b]), len(mine), sim, typical))
    out: list[SuspectedDuplicate] = []
    reported: set[frozenset] = set()
    excluded: set[str] = set()
    for d in sorted(found, key=lambda d: (-d.similarity, d.name)):
        pair = frozenset((d.name, d.other))
        if pair in reported or pair & excluded:
            continue
        # of the two, keep out the name with fewer photos (on a tie, the later name)
        d.excluded = max(pair, key=lambda n: (-int(counts[uniques.get_loc(n)]), n))
        reported.add(pair)
        excluded.add(d.excluded)
        out.append(d)
    return out
