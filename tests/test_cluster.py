"""Clustering unlabelled photos: groups, attachment to known individuals, folders, the command."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from conftest import run_cli
from photo_layouts import MODEL, PREPARED_SIZE, gaussian_embeddings, make_layout, shared_model

from jaguar_kit.photos.catalogue import build_catalogue
from jaguar_kit.photos.cluster import cluster, connected_groups, name_groups, pairwise_agreement
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos.inputs import read_photos


def test_connected_groups_recover_well_separated_individuals():
    x, y = gaussian_embeddings(n_ids=8, per=5, noise=0.3, seed=1)
    groups = connected_groups(x, 0.6)
    agree = pairwise_agreement(groups, y)
    assert agree["pair_precision"] == 1.0 and agree["pair_recall"] == 1.0 and agree["groups"] == 8
    assert connected_groups(x, 1.01).max() == len(y) - 1  # nothing links: every photo alone
    assert (connected_groups(x, -1.01) == 0).all()  # everything links: one group
    sizes = np.bincount(connected_groups(x[:12], 0.6))
    assert list(sizes) == sorted(sizes, reverse=True)  # largest group first


def test_connected_groups_are_transitive_links():
    # a - b - c in a chain (a and c not similar) are one group; d alone
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.28, 0.96, 0], [0, 0, 1]], np.float32)
    assert list(connected_groups(x, 0.75)) == [0, 0, 0, 1]


def test_name_groups_majority_and_disagreement():
    groups = np.array([0, 0, 0, 1, 1, 2, 3])
    decisions = ["A", "A", "B", "new", "new", "A", "new"]
    probs = [0.9, 0.8, 0.7, 0.1, 0.1, 0.95, 0.2]
    names, checks = name_groups(groups, decisions, probs)
    assert names == ["A", "new-001", "A-2", "new-002"]
    assert "B (1)" in checks[0] and "new animal" in checks[1]
    assert name_groups(groups, None, None)[0] == ["group-001", "group-002", "group-003", "group-004"]


def test_cluster_needs_a_threshold_or_catalogue(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(JaguarKitError, match="give --threshold"):
        cluster([], model=None, catalogue=None)


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("eco"))


def test_cluster_with_catalogue_attaches_groups(layout, tmp_path):
    model = shared_model()
    cat = build_catalogue(read_photos(layout.photos), model, tmp_path / "cat", progress=False)
    res = cluster(layout.unlabelled, model=model, catalogue=cat, cache_dir=tmp_path / "c", progress=False)
    t = res.table
    assert len(t) == len(layout.truth) and set(t["photo"]) == set(layout.truth)
    assert res.threshold == cat.calibration.threshold
    for name, members in t.groupby("group"):
        assert (members["group_size"] == len(members)).all()
        if not name.startswith("new-"):  # attached to a known individual: most members say so
            base = name.rsplit("-", 1)[0] if name not in cat.individuals else name
            assert base in cat.individuals and (members["decision"] == base).sum() >= 1
        else:
            assert (members["decision"] == "new").all()


def test_cli_cluster_writes_csv_report_and_folders(layout, tmp_path):
    for mode in ("link", "copy"):
        out = tmp_path / mode
        r = run_cli("cluster", "--photos", layout.unlabelled, "--out", out, "--model", MODEL, "--prepared-size",
                    PREPARED_SIZE, "--threshold", "0.9", "--folders", mode)
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(open(out / "clusters.csv")))
        assert len(rows) == len(layout.truth)
        files = [p for p in (out / "groups").rglob("*") if not p.is_dir()]
        assert len(files) == len(rows)
        for row in rows:
            name = row["photo"].replace("/", "__")
            f = out / "groups" / row["group"] / name
            assert f.read_bytes() == (layout.unlabelled / row["photo"]).read_bytes()
            assert f.is_symlink() == (mode == "link")
        assert (out / "report.html").is_file()
    # without a catalogue or threshold: one line saying what to give
    r = run_cli("cluster", "--photos", layout.unlabelled, "--out", tmp_path / "x", "--model", MODEL)
    assert r.returncode == 2 and "give --threshold" in r.stderr and r.stderr.count("\n") == 1
    assert os.path.isdir(layout.unlabelled)
