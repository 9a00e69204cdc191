"""Catalogues: calibration of the `new` decision, identification, updates, guards, the commands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from photo_layouts import MODEL, PREPARED_SIZE, gaussian_embeddings, make_layout, shared_model

from jaguar_kit.photos.calibration import (
    calibrate,
    hold_out_scores,
    suspected_duplicates,
    threshold_for_rate,
)
from jaguar_kit.photos.catalogue import Catalogue, build_catalogue, load_catalogue
from jaguar_kit.photos.evaluate import evaluate_open_set, open_set_split
from jaguar_kit.photos.identify import identify, identify_embeddings
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.logistic import fit_logistic
from jaguar_kit.metrics import auroc, open_set_scores
from jaguar_kit.photos.inputs import read_photos

# --- calibration on embeddings of known quality (no model needed) ------------------------------


def test_fit_logistic_recovers_parameters():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 40_000)
    y = rng.random(x.size) < 1 / (1 + np.exp(-(4.0 * x - 1.0)))
    (a,), b = fit_logistic(x, y, l2=0, single_class="fit", max_iter=50)
    assert abs(a - 4.0) < 0.15 and abs(b + 1.0) < 0.06


def test_threshold_for_rate_is_the_tightest_that_meets_the_target():
    rng = np.random.default_rng(1)
    v = rng.normal(size=1000)
    t = threshold_for_rate(v, 0.05)
    assert np.mean(v >= t) <= 0.05
    assert np.mean(v >= v[v < t].max()) > 0.05  # any lower threshold breaks the target


def test_hold_out_scores_match_a_brute_force_reference():
    x, y = gaussian_embeddings(n_ids=6, per=4, seed=2)
    y[5] = "solo"  # an individual with a single photo
    codes, uniques = pd.factorize(pd.Series(y))
    h = hold_out_scores(x, codes, len(uniques))
    for i in range(len(y)):
        own = [x[i] @ x[j] for j in range(len(y)) if j != i and y[j] == y[i]]
        others = {u: max(x[i] @ x[j] for j in range(len(y)) if y[j] == u) for u in set(y) if u != y[i]}
        assert h.own[i] == pytest.approx(max(own) if own else -np.inf, abs=1e-6)
        best = max(others, key=others.get)
        assert h.new_top[i] == pytest.approx(others[best], abs=1e-6) and uniques[h.new_arg[i]] == best


def test_a_known_photo_is_never_scored_against_its_own_encounter():
    """A burst is one sighting: the calibration's known cases pair a photo only with other
    encounters of its individual (with no other encounter it is no known case at all)."""
    x, y = gaussian_embeddings(n_ids=5, per=6, seed=4)
    enc = [f"{label}-{i % 3}" if i % 2 else "" for i, label in enumerate(y)]  # some photos without an encounter
    codes, uniques = pd.factorize(pd.Series(y))
    h = hold_out_scores(x, codes, len(uniques), enc)
    for i in range(len(y)):
        own = [x[i] @ x[j] for j in range(len(y))
               if j != i and y[j] == y[i] and not (enc[i] and enc[j] == enc[i])]
        assert h.own[i] == pytest.approx(max(own) if own else -np.inf, abs=1e-6)
    # other individuals' photos are all still there for the "new" case
    assert np.allclose(h.new_top, hold_out_scores(x, codes, len(uniques)).new_top)


def test_realised_false_merge_rate_on_held_out_identities_meets_the_target():
    """The point of the calibration: on individuals it never saw, the share of photos wrongly
    attached to a known individual lands at the target (averaged over splits)."""
    rates, estimates = [], []
    for seed in range(10):
        x, y = gaussian_embeddings(n_ids=60, per=10, seed=seed)
        f = evaluate_open_set(x, y, new_share=0.3, seed=seed, target_false_merge=0.05)
        rates.append(f["false_merge"])
        estimates.append(f["calibration_estimate"]["false_merge"])
        assert f["auroc_known_vs_new"] > 0.9 and f["top1_known"] > 0.85
    assert abs(np.mean(rates) - 0.05) < 0.02, rates
    assert max(estimates) <= 0.05
    f = evaluate_open_set(x, y, new_share=0.3, seed=0, target_false_merge=0.2)
    assert 0.1 < f["false_merge"] < 0.3  # another target moves the threshold accordingly


def test_probabilities_are_calibrated():
    pred, hit = [], []
    for seed in range(3):
        x, y = gaussian_embeddings(seed=seed)
        cat_rows, known, new = open_set_split(y, 0.3, 0.5, seed)
        ids = [y[i] for i in cat_rows]
        cat = Catalogue(ids, ids, ids, [""] * len(ids), np.full((len(ids), 4), -1), x[cat_rows], [b""] * len(ids), {},
                        calibrate(x[cat_rows], ids))
        q = np.concatenate([known, new])
        c = identify_embeddings(cat, x[q], 5)
        top_ids, probs = c.ids, c.probs
        pred.append(probs.ravel())
        hit.append((top_ids == np.array([y[i] for i in q], dtype=object)[:, None]).ravel())
    pred, hit = np.concatenate(pred), np.concatenate(hit)
    assert abs(pred.mean() - hit.mean()) < 0.03
    for lo, hi in ((0.0, 0.2), (0.5, 1.0)):  # reliability per band
        band = (pred >= lo) & (pred < hi)
        assert abs(pred[band].mean() - hit[band].mean()) < 0.1


def test_open_set_split_is_identity_disjoint():
    _, y = gaussian_embeddings(n_ids=20, per=5)
    cat, known, new = open_set_split(y, 0.25, 0.5, seed=3)
    ids = np.array(y)
    assert not set(ids[new]) & set(ids[cat]) and set(ids[known]) <= set(ids[cat])
    assert len(set(ids[new])) == 5 and len(cat) + len(known) + len(new) == len(y)


def test_duplicate_identity_guard():
    x, y = gaussian_embeddings(n_ids=12, per=8, noise=0.9, seed=4)
    y = [("id000b" if (v == "id000" and i % 2) else v) for i, v in enumerate(y)]  # one animal, two names
    codes, _ = pd.factorize(pd.Series(y))
    h = hold_out_scores(x, codes, codes.max() + 1)
    pairs = [({d.name, d.other}, d.excluded) for d in suspected_duplicates(y, h)]
    assert pairs == [({"id000", "id000b"}, "id000b")]  # reported once; the later name of two equal ones kept out


def test_auroc_and_open_set_scores_against_references():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(1, 1, 50).round(1), rng.normal(0, 1, 40).round(1)  # with ties
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(pos, neg) == pytest.approx(ref)
    top_ids = np.array([["A", "B"], ["B", "A"], ["A", "C"], ["C", "A"]], dtype=object)
    top_scores = np.array([[0.9, 0.1], [0.4, 0.3], [0.8, 0.2], [0.3, 0.2]])
    f = open_set_scores(top_ids, top_scores, ["A", "A", "X", "Y"], {"A", "B", "C"}, threshold=0.5)
    assert f["top1_known"] == 0.5 and f["top5_known"] == 1.0
    assert f["false_merge"] == 0.5 and f["false_split"] == 0.5 and f["wrong_individual"] == 0.0
    assert f["auroc_known_vs_new"] == pytest.approx(0.75)  # 3 of the 4 known-new pairs ordered right


def test_too_few_identities_is_a_clear_error():
    x, y = gaussian_embeddings(n_ids=2, per=3)
    with pytest.raises(JaguarKitError, match="needs at least 3 individuals"):
        calibrate(x, y)


# --- real photos through the frozen EfficientNet-Lite0 -----------------------------------------


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("eco"))


def test_catalogue_build_update_and_reuse(layout, tmp_path):
    model = shared_model()
    photos = read_photos(layout.photos, need_identity=True)
    first = [p for p in photos if p.identity != layout.known[-1]]
    cat = build_catalogue(first, model, tmp_path / "cat", progress=False)
    assert len(cat) == len(first) and cat.embedded_now == len(first)
    assert cat.model["digest"] == model.digest and cat.calibration is not None
    # adding the last individual embeds only its photos
    cat2 = build_catalogue(photos, model, tmp_path / "cat", progress=False)
    assert len(cat2) == len(photos) and cat2.embedded_now == len(photos) - len(first)
    again = build_catalogue(photos, model, tmp_path / "cat", progress=False)
    assert again.embedded_now == 0
    loaded = load_catalogue(tmp_path / "cat")
    assert loaded.identities == again.identities and np.array_equal(loaded.embeddings, again.embeddings)
    assert loaded.calibration == again.calibration
    header = json.loads((tmp_path / "cat" / "catalogue.json").read_text())
    assert header["photos"] == len(photos) and header["model"]["source"] == MODEL
    # a relabelled photo takes its new individual without being embedded again
    moved = [p if p.name != photos[0].name else type(p)(p.path, layout.known[-1], None, p.name) for p in photos]
    relabelled = build_catalogue(moved, model, tmp_path / "cat", progress=False)
    assert relabelled.embedded_now == 0 and relabelled.identities.count(layout.known[-1]) == \
        again.identities.count(layout.known[-1]) + 1
    # the same embeddings as a fresh run of the model (the cache does not go stale)
    from jaguar_kit.photos.model import embed_photos

    _, fresh, _ = embed_photos(model, photos[:3], tmp_path / "fresh", progress=False)
    assert np.allclose(fresh, loaded.embeddings[:3], atol=1e-5)


def test_catalogue_refuses_another_model(layout, tmp_path):
    from dataclasses import replace

    model = shared_model()
    build_catalogue(read_photos(layout.photos), model, tmp_path / "cat", progress=False)
    other = replace(model, digest="0123456789abcdef")
    with pytest.raises(JaguarKitError, match="made with model frozen:efficientnet-lite0 .*digest"):
        build_catalogue(read_photos(layout.photos), other, tmp_path / "cat", progress=False)
    with pytest.raises(JaguarKitError, match="cannot be compared"):
        identify(tmp_path / "cat", layout.unlabelled, model=replace(model, prepared_size=64), progress=False)


def test_same_file_under_two_individuals_warns(layout, tmp_path):
    photos = read_photos(layout.photos)
    dup = type(photos[0])(photos[0].path, layout.known[1], None, "copy-of-" + photos[0].name)
    cat = build_catalogue(photos + [dup], shared_model(), tmp_path / "cat", progress=False)
    assert any("same photo is listed under 2 individuals" in w for w in cat.warnings)


def test_damaged_catalogue_is_one_line(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "catalogue.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(JaguarKitError, match="not a readable jaguar_kit catalogue"):
        load_catalogue(tmp_path / "cat")
    with pytest.raises(JaguarKitError, match="no catalogue here"):
        load_catalogue(tmp_path / "nothing")


def test_identify_top_k_decisions_and_known_photo(layout, tmp_path):
    model = shared_model()  # the global score alone (coat-pattern decisions: tests/test_identify_coat.py)
    cat = build_catalogue(read_photos(layout.photos), model, tmp_path / "cat", progress=False, coat="off")
    queries = read_photos(layout.unlabelled, folder_labels=False)
    # a catalogue photo itself, renamed: identified as its individual with the top score
    res = identify(cat, queries + read_photos(layout.photos)[:1], model=model, top_k=3, cache_dir=tmp_path / "q",
                   progress=False)
    t = res.table
    assert len(t) == len(queries) + 1
    assert {"photo", "decision", "probability", "id_1", "score_1", "prob_1", "id_3", "check"} <= set(t.columns)
    assert (t["score_1"] >= t["score_2"]).all() and (t["score_2"] >= t["score_3"]).all()
    assert t["id_1"].isin(cat.individuals).all()
    cal = cat.calibration
    assert ((t["decision"] == "new") == (t["score_1"] < cal.threshold)).all()
    last = t.iloc[-1]
    assert last["decision"] == layout.known[0] and last["score_1"] == pytest.approx(1.0, abs=1e-4)
    assert "Same file as catalogue photo" in last["check"]
    # probabilities grow with the score
    order = np.argsort(t["score_1"].to_numpy())
    assert np.all(np.diff(t["prob_1"].to_numpy()[order]) >= -1e-9)


# --- the commands, as a user runs them ----------------------------------------------------------


def test_cli_index_identify_on_a_folder(layout, tmp_path):
    r = run_cli("index", "--photos", layout.photos, "--out", tmp_path / "cat", "--model", MODEL,
                "--prepared-size", PREPARED_SIZE)
    assert r.returncode == 0, r.stderr
    n = sum(1 for _ in layout.photos.rglob("IMG_*"))
    assert f"{n} photos of {len(layout.known)} individuals ({n} embedded now" in r.stdout
    r = run_cli("index", "--photos", layout.photos, "--out", tmp_path / "cat", "--model", MODEL,
                "--prepared-size", PREPARED_SIZE)
    assert r.returncode == 0 and "(0 embedded now" in r.stdout, r.stdout + r.stderr
    r = run_cli("identify", "--catalogue", tmp_path / "cat", "--photos", layout.unlabelled, "--out", tmp_path / "res",
                "--top-k", "2")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "res" / "identify.csv")))
    assert len(rows) == len(layout.truth) and {r["photo"] for r in rows} == set(layout.truth)
    assert all(r["decision"] in set(layout.known) | {"new"} for r in rows)
    assert (tmp_path / "res" / "report.html").stat().st_size > 1000


def test_cli_index_on_csv_with_boxes_and_subfolders(layout, tmp_path):
    r = run_cli("index", "--photos", layout.csv, "--out", tmp_path / "cat", "--model", MODEL,
                "--prepared-size", PREPARED_SIZE)
    assert r.returncode == 0, r.stderr
    cat = load_catalogue(tmp_path / "cat")
    assert all(b[2] > 0 for b in cat.boxes) and set(cat.identities) == set(layout.known)
    # the boxed frames embed like the mask-less JPEGs they were cut from (the box crops the frame away)
    folder = build_catalogue(read_photos(layout.photos), shared_model(), tmp_path / "cat2", progress=False)
    by_name = {n.split("/")[0] + "_" + str(int(n[-8:-4])): i for i, n in enumerate(folder.names) if "/2023/" in n}
    pairs = [(i, by_name[n.split("/")[-1][:-4]]) for i, n in enumerate(cat.names) if n.split("/")[-1][:-4] in by_name]
    assert len(pairs) == len(by_name) > 0
    for i, j in pairs:  # its source is the closest photo in the folder catalogue, and close
        sims = folder.embeddings @ cat.embeddings[i]
        assert sims.argmax() == j and sims[j] > 0.9


def test_cli_bad_input_is_one_line(layout, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,identity\nphotos/nope.jpg,Dajun\n")
    r = run_cli("index", "--photos", bad, "--out", tmp_path / "cat", "--model", MODEL)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.csv line 2: photos/nope.jpg: file not found" in r.stderr
    r = run_cli("identify", "--catalogue", tmp_path / "none", "--photos", layout.unlabelled, "--out", tmp_path / "r")
    assert r.returncode == 2 and "no catalogue here" in r.stderr


def test_cli_score_open_set(tmp_path):
    from jaguar_kit.pipeline import Embeddings

    x, y = gaussian_embeddings(n_ids=30, per=8, seed=6)
    names = [f"img_{i:04d}.png" for i in range(len(y))]
    Embeddings(names, x, "gauss").save(tmp_path / "emb.npz")
    pd.DataFrame({"filename": names, "ground_truth": y}).to_csv(tmp_path / "labels.csv", index=False)
    r = run_cli("score", "--embeddings", tmp_path / "emb.npz", "--labels", tmp_path / "labels.csv", "--open-set")
    assert r.returncode == 0, r.stderr
    assert "identity-balanced mAP" in r.stdout and "AUROC known vs new" in r.stdout
    assert "false-merge" in r.stdout and "(target 0.05)" in r.stdout and "21 known individuals, 9 held out" in r.stdout


def test_catalogue_demo_gives_the_figures_and_the_page(competition, tmp_path):
    from jaguar_kit.photos.evaluate import catalogue_demo

    f = catalogue_demo(competition, shared_model(), tmp_path / "demo", progress=False)
    for key in ("top1_known", "top5_known", "auroc_known_vs_new", "false_merge", "false_split", "target_false_merge",
                "index_photos_per_s", "identify_photos_per_s"):
        assert key in f and f[key] == f[key], key  # present and not NaN
    assert f["new_individuals"] == 2 and f["known_individuals"] == 4 and f["new_queries"] == 12
    assert 0 <= f["false_merge"] <= 1 and f["index_photos_per_s"] > 0
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "identify.csv").is_file()
    assert json.loads((tmp_path / "demo" / "figures.json").read_text())["top5_known"] == f["top5_known"]
