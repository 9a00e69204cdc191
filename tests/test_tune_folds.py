"""`jaguar-kit tune --folds`: every fold's out-of-fold embeddings, each scored within its fold, pooled by identity."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_OVERRIDES, run_cli
from jaguar_kit.config import load_config
from jaguar_kit.metrics import identity_balanced_map, pooled_score
from jaguar_kit.pipeline import Embeddings, split_images
from jaguar_kit.train.checkpoint import read_checkpoint
from jaguar_kit.tune import TuneGrid, tune_folds

SMALL = TuneGrid(query_expansion_k=(0, 2), k1=(4, 8), k2=(1, 3), lambda_value=(0.3,), rerank_blend=(0.5, 1.0))


def query_aps(sim: np.ndarray, labels) -> list[tuple[str, float]]:
    """(identity, AP) of every query with a true match, by the definition: mean precision at each true match."""
    out = []
    for q in range(len(labels)):
        others = [j for j in sorted(range(len(labels)), key=lambda j: -sim[q, j]) if j != q]
        hits = [labels[j] == labels[q] for j in others]
        if any(hits):
            out.append((labels[q], np.mean([np.mean(hits[:k + 1]) for k, h in enumerate(hits) if h])))
    return out


def test_pooling_folds_is_the_identity_balanced_map_of_all_their_queries():
    # three folds of one identity set (some identities in one fold only, some singletons): each identity's
    # AP is the mean over its queries in every fold, the score the mean over identities
    rng = np.random.default_rng(0)
    scores, queries = [], []
    for n, ids in ((9, "abcd"), (7, "abce"), (5, "aff")):
        labels = [ids[i % len(ids)] for i in range(n)]
        sim = rng.normal(size=(n, n))
        scores.append(identity_balanced_map(sim, labels))
        queries += query_aps(sim, labels)
    per_identity = pd.DataFrame(queries, columns=["identity", "ap"]).groupby("identity")["ap"].mean()
    pooled = pooled_score(scores)
    assert pooled.map == pytest.approx(per_identity.mean(), abs=1e-12)
    assert list(pooled.per_identity.dropna()["identity"]) == list(per_identity.index)
    assert pooled.n_queries == len(queries)
    assert pooled_score(scores[:1]) is scores[0]  # one set: its own score, untouched


def fold_embeddings(identities, per_id, seed, noise=0.8, dim=16):
    """One fold's validation embeddings in its own model's space (a random rotation of shared centres)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(26, dim))
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    idx = np.repeat([ord(i) - 97 for i in identities], per_id)
    vecs = (centers[idx] + noise * rng.normal(size=(len(idx), dim))) @ rotation
    names = [f"f{seed}_{k:03d}.png" for k in range(len(idx))]
    return Embeddings(names, vecs.astype(np.float32)), dict(zip(names, [chr(97 + i) for i in idx]))


def test_tune_folds_rests_on_every_folds_identities_and_keeps_the_rule():
    # identity-disjoint folds (open-set folds): the choice rests on the identities of all of them
    folds, labels = {}, {}
    for k, ids in enumerate(("abcdef", "ghijkl", "mnopqr")):
        emb, lab = fold_embeddings(ids, 4, seed=k)
        folds[f"fold{k}"] = {"none": [emb]}
        labels.update(lab)
    result = tune_folds(folds, labels, grid=SMALL, progress=False)
    assert result.evidence["folds"] == 3 and result.evidence["identities"] == 18 and result.evidence["images"] == 72
    for d in result.decisions.values():
        assert d["identities"] == 18  # the held-out evidence covers every fold's identities once
        assert d["allowed"] == (d["interval"][0] > 0) and (d["allowed"] or not d["used"])
    # each fold scored within its own space: the plain baseline is the pooled per-fold score, which a single
    # set of all the folds' vectors (compared across spaces) is not
    def cosine_map(vecs, names):
        v = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        return identity_balanced_map(v @ v.T, [labels[n] for n in names])

    sets = [e["none"][0] for e in folds.values()]
    per_fold = pooled_score([cosine_map(e.vectors, e.names) for e in sets]).map
    mixed = cosine_map(np.concatenate([e.vectors for e in sets]), [n for e in sets for n in e.names]).map
    assert result.baselines["plain"]["map"] == pytest.approx(per_fold, abs=1e-6)
    assert abs(mixed - per_fold) > 0.01


@pytest.fixture(scope="module")
def folds_run(competition, tmp_path_factory):
    out = tmp_path_factory.mktemp("folds") / "run"
    r = run_cli("train", "--all-folds", "--data", competition, "--out", out,
                overrides=[*TINY_OVERRIDES, "data.num_folds=2", "train.epochs=1"])
    assert r.returncode == 0, r.stderr
    return out


def test_cli_tune_folds_pools_every_fold_and_submit_reads_it(competition, folds_run, tmp_path):
    r = run_cli("tune", "--folds", folds_run, "--data", competition, "--out", tmp_path / "tuned",
                overrides=["embed.batch_size=16", "embed.chunk_size=5", "train.device=cpu"])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "tuned" / "tune_report.json").read_text())
    ev = report["evidence"]
    # what each fold validated on, from the folds' own configs
    val = {}
    for k in (0, 1):
        run_cfg = read_checkpoint(folds_run / f"fold{k}" / "best.pt", verify=False).run_config
        names, _, ids = split_images(run_cfg, competition, "val")
        val[f"fold{k}"] = (names, ids)
    assert ev["folds"] == 2
    assert [f["images"] for f in ev["per_fold"]] == [len(val["fold0"][0]), len(val["fold1"][0])]
    assert ev["images"] == len(val["fold0"][0]) + len(val["fold1"][0]) > max(len(v[0]) for v in val.values())
    assert ev["identities"] == len(set(val["fold0"][1]) | set(val["fold1"][1]))
    assert f"{ev['folds']} folds, {ev['identities']} identities" in r.stdout
    for option, d in report["decisions"].items():  # the noise rule, over the pooled identities
        assert d["allowed"] == (d["interval"][0] > 0) and (d["allowed"] or not d["used"])
        assert d["identities"] == ev["identities"]
    tuned = json.loads((tmp_path / "tuned" / "tuned.json").read_text())
    assert tuned["_evidence"] == {"folds": 2, "identities": ev["identities"], "images": ev["images"]}
    cfg = load_config(tmp_path / "tuned" / "tuned.json")  # the config submit --config reads
    assert cfg.retrieval.rerank == report["decisions"]["rerank"]["used"]
    assert list((tmp_path / "tuned" / "cache").rglob("*.npz"))  # embeddings cached: a rerun reuses them


def test_cli_tune_folds_bad_run_is_one_line(competition, tmp_path):
    r = run_cli("tune", "--folds", tmp_path, "--data", competition, "--out", tmp_path / "t")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--all-folds" in r.stderr
    (tmp_path / "run" / "fold0").mkdir(parents=True)
    r = run_cli("tune", "--folds", tmp_path / "run", "--data", competition, "--out", tmp_path / "t")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fold0" in r.stderr and "best.pt" in r.stderr
