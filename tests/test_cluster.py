"""Clustering unlabelled photos: groups, attachment to known individuals, folders, the command."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from conftest import run_cli
from photo_layouts import MODEL, PREPARED_SIZE, gaussian_embeddings, make_layout, shared_model

from jaguar_kit.photos.catalogue import build_catalogue
from jaguar_kit.photos.calibration import calibrate
from jaguar_kit.photos.cluster import cluster, group_photos, linkage_threshold, name_groups, pairwise_agreement
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos.inputs import read_photos


@pytest.mark.parametrize("linkage", ["average", "single"])
def test_groups_recover_well_separated_individuals(linkage):
    x, y = gaussian_embeddings(n_ids=8, per=5, noise=0.3, seed=1)
    groups = group_photos(x, 0.6, linkage)
    agree = pairwise_agreement(groups, y)
    assert agree["pair_precision"] == 1.0 and agree["pair_recall"] == 1.0 and agree["groups"] == 8
    assert group_photos(x, 1.0, linkage).max() == len(y) - 1  # nothing links: every photo alone
    assert (group_photos(x, -1.0, linkage) == 0).all()  # everything links: one group
    sizes = np.bincount(group_photos(x[:12], 0.6, linkage))
    assert list(sizes) == sorted(sizes, reverse=True)  # largest group first


def test_average_linkage_does_not_chain():
    # a - b - c in a chain (a and c not similar): single linkage joins all three, average keeps a apart
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.28, 0.96, 0], [0, 0, 1]], np.float32)
    assert list(group_photos(x, 0.75, "single")) == [0, 0, 0, 1]
    assert list(group_photos(x, 0.75, "average")) in ([1, 0, 0, 2], [0, 0, 1, 2])
    with pytest.raises(JaguarKitError, match="cosine similarity"):
        group_photos(x, float("nan"))


def test_average_linkage_beats_single_linkage_on_unseen_individuals():
    """The catalogue calibrates the cut; on 20 unseen individuals average linkage keeps pairs of
    different animals apart where single linkage chains them (pairwise precision), at no loss of recall."""
    x, y = gaussian_embeddings(n_ids=40, per=10, dim=48, noise=1.1, seed=0)
    ids = np.array(y)
    known = np.isin(ids, [f"id{i:03d}" for i in range(20)])
    q, qy = x[~known], ids[~known]
    single = pairwise_agreement(group_photos(q, calibrate(x[known], list(ids[known])).threshold, "single"), qy)
    t = linkage_threshold(x[known], list(ids[known]), 0.05, "average")
    average = pairwise_agreement(group_photos(q, t, "average"), qy)
    assert average["pair_precision"] >= 0.9 > single["pair_precision"]
    assert average["pair_recall"] >= single["pair_recall"]


@pytest.mark.parametrize("linkage", ["average", "single"])
def test_linkage_threshold_equals_cutting_and_scoring_the_tree_at_every_height(linkage):
    """The one-pass replay of the merges gives the cut a brute-force search over every height gives."""
    from scipy.cluster.hierarchy import fcluster, linkage as build
    from scipy.spatial.distance import squareform

    for noise, seed, target in ((0.5, 0, 0.05), (1.1, 1, 0.05), (1.4, 2, 0.2), (2.5, 3, 0.05)):
        x, y = gaussian_embeddings(n_ids=12, per=6, noise=noise, seed=seed)
        x = np.concatenate([x, x[:6]])  # exact duplicates: merges at tied heights
        y = list(y) + list(y[:6])
        d = np.clip(1 - x.astype(np.float64) @ x.T.astype(np.float64), 0, 2)
        np.fill_diagonal(d, 0)
        z = build(squareform((d + d.T) / 2, checks=False), linkage)
        best = None
        for height in np.unique(z[:, 2]):
            if pairwise_agreement(fcluster(z, height, criterion="distance"), y)["pair_precision"] < 1 - target:
                break
            best = height
        expected = 1.0 if best is None else float(np.clip(1 - best, -1, 1))
        assert linkage_threshold(x, y, target, linkage) == expected


def test_name_groups_by_strict_majority_and_one_group_per_known_individual():
    groups = np.array([0, 0, 0, 1, 1, 2, 3])
    decisions = ["A", "A", "B", "new", "new", "A", "new"]
    probs = [0.9, 0.8, 0.7, 0.1, 0.1, 0.95, 0.2]
    groups_out, names, checks = name_groups(groups, decisions, probs)
    assert names == ["A", "new-001", "new-002"]  # both groups of A are one group
    assert list(groups_out) == [0, 0, 0, 1, 1, 0, 2]
    assert "B (1)" in checks[0] and "new animal" in checks[1]
    assert name_groups(groups, None, None)[1] == ["group-001", "group-002", "group-003", "group-004"]
    # 1 of 11 photos matching Bob does not make the group Bob's
    _, names, checks = name_groups(np.zeros(11, int), ["Bob"] + ["new"] * 10, [0.6] + [0.1] * 10)
    assert names == ["new-001"] and "Only 1 of 11" in checks[0]
    # four photos identified as José in four groups: one group José
    groups_out, names, _ = name_groups(np.arange(4), ["José"] * 4, [0.9] * 4)
    assert names == ["José"] and list(groups_out) == [0, 0, 0, 0]


def test_cluster_needs_a_threshold_or_catalogue(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(JaguarKitError, match="give --threshold"):
        cluster([], model=None, catalogue=None)
    with pytest.raises(JaguarKitError, match="2 or more individuals"):
        linkage_threshold(np.eye(3, dtype=np.float32), ["a", "a", "a"])


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("eco"))


def test_cluster_with_catalogue_attaches_groups(layout, tmp_path):
    model = shared_model()
    cat = build_catalogue(read_photos(layout.photos), model, tmp_path / "cat", progress=False)
    res = cluster(layout.unlabelled, model=model, catalogue=cat, cache_dir=tmp_path / "c", progress=False)
    t = res.table
    assert len(t) == len(layout.truth) and set(t["photo"]) == set(layout.truth)
    assert res.threshold == linkage_threshold(cat.embeddings, cat.identities)
    for name, members in t.groupby("group"):
        assert (members["group_size"] == len(members)).all()
        if not name.startswith("new-"):  # attached to a known individual: most members say so
            assert name in cat.individuals and 2 * (members["decision"] == name).sum() > len(members)
        else:  # no known individual has a majority
            known_votes = members["decision"][members["decision"] != "new"].value_counts()
            assert 2 * (known_votes.max() if len(known_votes) else 0) <= len(members)


def test_cli_cluster_writes_csv_report_and_folders(layout, tmp_path):
    for mode in ("link", "copy"):
        out = tmp_path / mode
        r = run_cli("cluster", "--photos", layout.unlabelled, "--out", out, "--model", MODEL, "--prepared-size",
                    PREPARED_SIZE, "--threshold", "0.9", "--folders", mode)
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(open(out / "clusters.csv")))
        assert len(rows) == len(layout.truth)
        files = list((out / "groups").glob("*/*"))  # beside the group folders: manifest.json, the marker
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
