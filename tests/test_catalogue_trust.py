"""Catalogues you can trust (issue 17): one writer, duplicate names found before calibrating,
decisions worded by their probability, a banner when the model cannot separate the animals,
inputs checked where parsed, the model found again by digest, damaged .npz files in one line."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_command, cli_env, run_cli
from photo_layouts import MODEL, PREPARED_SIZE, gaussian_embeddings, make_layout, shared_model

import jaguar_kit as jk
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.photos.calibration import (
    Calibration,
    calibrate,
    calibration_banner,
    decision_band,
    decision_words,
)
from jaguar_kit.photos.catalogue import Catalogue, build_catalogue, calibrate_catalogue, load_catalogue
from jaguar_kit.photos.identify import identify, what_to_check
from jaguar_kit.photos.inputs import read_photos
from jaguar_kit.pipeline import Embeddings

MODEL_ARGS = ("--model", MODEL, "--prepared-size", str(PREPARED_SIZE))


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("eco"))


def _csv(path: Path, photos, rename: dict[str, str] | None = None, extra=()) -> Path:
    """A path,identity CSV of ``photos`` (identities renamed by ``rename``) plus ``extra`` rows."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity"])
        w.writerows([str(p.path), (rename or {}).get(p.identity, p.identity)] for p in photos)
        w.writerows(extra)
    return path


def _one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and text in r.stderr.strip().splitlines()[-1], r.stderr


# --- 1. one writer per catalogue ----------------------------------------------------------------


@pytest.mark.slow  # command-line subprocesses (about 25-70 s on 2 shared cores)
def test_two_index_runs_at_once_keep_both_runs_individuals(layout, tmp_path):
    """The first run is frozen mid-embedding (after it read the catalogue); the second runs
    meanwhile. Without a lock the first then overwrites the second's individuals."""
    photos = read_photos(layout.photos, need_identity=True)
    first = _csv(tmp_path / "a.csv", [p for p in photos if p.identity in layout.known[:2]])
    second = _csv(tmp_path / "b.csv", [p for p in photos if p.identity in layout.known[2:]])
    cat = tmp_path / "cat"
    env = cli_env(JAGUAR_KIT_FAULT="chunk-write:1:SIGSTOP")
    one = subprocess.Popen(cli_command("index", "--photos", first, "--out", cat, *MODEL_ARGS), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while Path(f"/proc/{one.pid}/stat").read_text().split(") ")[1][0] != "T":  # stopped at the chunk write
            assert one.poll() is None and time.time() < deadline, one.communicate()
            time.sleep(0.1)
        err = tmp_path / "two.err"
        with open(err, "w") as fh:
            two = subprocess.Popen(cli_command("index", "--photos", second, "--out", cat, *MODEL_ARGS), env=cli_env(),
                                   stdout=subprocess.PIPE, stderr=fh, text=True)
            while two.poll() is None and "waiting for it to finish" not in err.read_text():
                assert time.time() < deadline
                time.sleep(0.1)
        if two.poll() is None:  # waiting, and saying for whom
            assert f"in use by process {one.pid}" in err.read_text()
    finally:
        os.kill(one.pid, signal.SIGCONT)
    out_one = one.communicate(timeout=120)
    two.wait(timeout=120)
    assert one.returncode == 0 and two.returncode == 0, out_one
    assert load_catalogue(cat).individuals == sorted(layout.known)  # neither run's individuals lost


@pytest.mark.slow  # command-line subprocesses (about 25-70 s on 2 shared cores)
def test_killed_index_keeps_the_earlier_individuals_and_a_rerun_completes(layout, tmp_path):
    photos = read_photos(layout.photos, need_identity=True)
    first = _csv(tmp_path / "a.csv", [p for p in photos if p.identity in layout.known[:3]])
    second = _csv(tmp_path / "b.csv", [p for p in photos if p.identity == layout.known[3]])
    cat = tmp_path / "cat"
    assert run_cli("index", "--photos", first, "--out", cat, *MODEL_ARGS).returncode == 0
    r = run_cli("index", "--photos", second, "--out", cat, fault="chunk-write:1")  # SIGKILL mid-embedding
    assert r.returncode == -signal.SIGKILL
    assert load_catalogue(cat).individuals == sorted(layout.known[:3])
    r = run_cli("index", "--photos", second, "--out", cat)  # no --model: the catalogue's own
    assert r.returncode == 0, r.stderr
    assert load_catalogue(cat).individuals == sorted(layout.known)


# --- 2. duplicate individuals ------------------------------------------------------------------


@pytest.mark.slow  # command-line subprocesses (about 25-70 s on 2 shared cores)
def test_two_names_for_one_animal_are_reported_once_and_kept_out_of_the_calibration(layout, tmp_path):
    """The same photos under `X` and `<b>X</b>`: before, the duplicate pushed the threshold to
    about 1 (every known photo called new) without a word."""
    photos = read_photos(layout.photos, need_identity=True)
    bob = layout.known[0]
    dup = f"<b>{bob}</b>"
    clean = build_catalogue(photos, shared_model(), tmp_path / "clean", progress=False)
    listing = _csv(tmp_path / "dup.csv", photos, extra=[(str(p.path), dup) for p in photos if p.identity == bob])
    r = run_cli("index", "--photos", listing, "--out", tmp_path / "cat", *MODEL_ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("may be the same animal") == 1, r.stderr  # printed once, not twice
    cat = load_catalogue(tmp_path / "cat")
    said = [w for w in cat.warnings if "may be the same animal" in w]
    assert len(said) == 1 and bob in said[0] and dup in said[0]
    assert json.loads((tmp_path / "cat" / "catalogue.json").read_text())["warnings"] == cat.warnings
    cal = cat.calibration
    assert len(cal.excluded) == 1 and cal.excluded[0] in (bob, dup)
    # calibrated as if the duplicate name were not there
    assert cal.threshold == pytest.approx(clean.calibration.threshold) and cal.threshold < 0.99
    assert cal.estimated["false_split"] == pytest.approx(clean.calibration.estimated["false_split"])


def test_a_duplicate_with_other_photos_of_one_animal_does_not_push_the_threshold_up():
    """Half of one animal's photos under a second name, with a model that separates animals."""
    x, y = gaussian_embeddings(n_ids=12, per=8, noise=0.9, seed=4)
    clean = calibrate(x, y)
    y2 = [("id000b" if (v == "id000" and i % 2) else v) for i, v in enumerate(y)]
    inside = calibrate(x, y2)  # what main did: the duplicate inside the fit
    cat = Catalogue([str(i) for i in range(len(y2))], y2, [f"{i}.jpg" for i in range(len(y2))], [""] * len(y2),
                    np.full((len(y2), 4), -1), x, [b""] * len(y2), {})
    cal, warnings = calibrate_catalogue(cat, 0.05)
    assert len(warnings) == 1 and "id000 and id000b may be the same animal" in warnings[0].replace("id000b and id000",
                                                                                                   "id000 and id000b")
    assert cal.excluded == ["id000b"]
    assert abs(cal.threshold - clean.threshold) < abs(inside.threshold - clean.threshold)
    assert cal.estimated["false_split"] <= clean.estimated["false_split"] + 0.02 < inside.estimated["false_split"]


def test_distinct_animals_are_not_suspected():
    for seed in range(5):
        x, y = gaussian_embeddings(n_ids=20, per=6, noise=1.3, seed=seed)
        cat = Catalogue([str(i) for i in range(len(y))], y, [""] * len(y), [""] * len(y), np.full((len(y), 4), -1),
                        x, [b""] * len(y), {})
        assert calibrate_catalogue(cat, 0.05)[1] == []


# --- 3. decisions in plain bands; the separability banner -------------------------------------


def _cal(threshold_p: float = 0.1, a: float = 10.0) -> Calibration:
    t = (np.log(threshold_p / (1 - threshold_p)) - 0.0) / a
    return Calibration(t, threshold_p, a, 0.0, 0.05, {"false_split": 0.1, "auroc_known_vs_new": 0.9})


@pytest.mark.parametrize("p, band", [(0.99, "almost certainly"), (0.95, "almost certainly"), (0.9, "probably"),
                                     (0.6, "possibly"), (0.18, "doubtful")])
def test_decision_words_follow_the_probability(p, band):
    cal = _cal()
    score = (np.log(p / (1 - p))) / cal.a
    assert decision_band("Bob", p, cal) == band
    words = what_to_check("Bob", ["Bob", "Ann"], [score, -1.0], [p, 0.01], cal, None)
    assert words.lower().startswith(band)
    assert ("a glance" in words) == (band == "almost certainly")  # never "enough" at p = 0.18
    assert decision_words("new", "Bob", 0.05, cal).startswith("likely new")


@pytest.mark.slow  # command-line subprocesses (about 25-70 s on 2 shared cores)
def test_identify_csv_words_match_the_probabilities_and_carry_the_banner(layout, tmp_path):
    """The frozen model cannot tell these synthetic animals apart (the catalogue's own AUROC is
    below 0.5): the banner is printed once and is on every row of identify.csv."""
    assert run_cli("index", "--photos", layout.photos, "--out", tmp_path / "cat", *MODEL_ARGS).returncode == 0
    cat = load_catalogue(tmp_path / "cat")
    banner = calibration_banner(cat.calibration)
    assert banner and "cannot tell its individuals apart" in banner and cat.banner == banner
    r = run_cli("identify", "--catalogue", tmp_path / "cat", "--photos", layout.unlabelled, "--out", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("cannot tell its individuals apart") == 1
    t = pd.read_csv(tmp_path / "res" / "identify.csv")
    assert (t["caution"] == banner).all()
    for _, row in t.iterrows():
        assert row["confidence"] == decision_band(row["decision"], row["probability"], cat.calibration)
        assert ("glance" in row["check"]) == (row["probability"] >= 0.95)


def test_banner_rule():
    good = _cal()
    assert calibration_banner(good) is None
    assert "flat probabilities" in calibration_banner(Calibration(0.5, 0.2, 0.0, -1.4, 0.05, {}))
    assert "60% of its own known photos are called new" in calibration_banner(
        Calibration(0.5, 0.2, 5.0, -1.4, 0.05, {"false_split": 0.6, "auroc_known_vs_new": 0.9}))
    assert "AUROC 0.65" in calibration_banner(
        Calibration(0.5, 0.2, 5.0, -1.4, 0.05, {"false_split": 0.2, "auroc_known_vs_new": 0.65}))
    x, y = gaussian_embeddings(seed=1)
    assert calibration_banner(calibrate(x, y)) is None  # a model that separates: no banner
    assert calibration_banner(None) is None


# --- 4. inputs checked where they are parsed -----------------------------------------------------


@pytest.mark.parametrize("args, text", [
    (("identify", "--catalogue", "c", "--photos", "p", "--out", "o", "--top-k", "0"), "--top-k: must be 1 or more"),
    (("identify", "--catalogue", "c", "--photos", "p", "--out", "o", "--top-k", "-2"), "--top-k: must be 1 or more"),
    (("cluster", "--photos", "p", "--out", "o", "--threshold", "nan"), "--threshold: a cosine similarity"),
    (("cluster", "--photos", "p", "--out", "o", "--threshold", "7"), "--threshold: a cosine similarity"),
    (("index", "--photos", "p", "--out", "o", "--target-false-merge", "5"), "--target-false-merge: a share"),
    (("index", "--photos", "p", "--out", "o", "--target-false-merge", "0"), "--target-false-merge: a share"),
])
def test_bad_numbers_are_refused_when_parsed(args, text):
    _one_line_error(run_cli(*args), text)


@pytest.mark.slow  # command-line subprocesses (about 25-70 s on 2 shared cores)
def test_ema_decay_one_and_a_binary_config_are_one_line(competition, tmp_path):
    r = run_cli("train", "--data", competition, "--out", tmp_path / "run", overrides=["train.ema_decay=1"])
    _one_line_error(r, "train.ema_decay=1.0 must be in [0, 1)")
    assert not (tmp_path / "run").exists()
    (tmp_path / "best.pt").write_bytes(bytes(range(256)) * 8)
    r = run_cli("train", "--data", competition, "--out", tmp_path / "run", "--config", tmp_path / "best.pt")
    _one_line_error(r, "best.pt: not a config file (JSON or YAML text)")


def test_api_checks_top_k_and_target(layout, tmp_path):
    with pytest.raises(JaguarKitError, match="top-k must be a whole number, 1 or more"):
        identify(tmp_path / "none", layout.unlabelled, top_k=0)
    with pytest.raises(JaguarKitError, match="target false-merge rate must be between 0 and 1"):
        build_catalogue(layout.photos, shared_model(), tmp_path / "cat", target_false_merge=5)
    assert not (tmp_path / "cat").exists()


# --- 5. the model stored by digest ----------------------------------------------------------------


def _cli_in(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=cli_env(), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # trains the tiny reference run, then five commands (about 2 minutes on 2 cores)
def test_catalogue_finds_its_moved_checkpoint_by_digest(layout, reference_run, tmp_path):
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    shutil.copy(reference_run / "best.pt", work / "model" / "best.pt")
    r = _cli_in(work, "index", "--photos", layout.photos, "--out", "cat", "--model", "model/best.pt")
    assert r.returncode == 0, r.stderr
    recorded = load_catalogue(work / "cat").model
    assert recorded["source"] == str(work / "model" / "best.pt") and len(recorded["file_sha256"]) == 64
    # from another folder: the recorded absolute path
    r = _cli_in(tmp_path, "identify", "--catalogue", work / "cat", "--photos", layout.unlabelled, "--out", "r1")
    assert r.returncode == 0, r.stderr
    # both moved, the checkpoint beside the catalogue folder: found and verified by digest
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    shutil.move(moved / "model" / "best.pt", moved / "best.pt")
    r = _cli_in(tmp_path, "identify", "--catalogue", moved / "cat", "--photos", layout.unlabelled, "--out", "r2")
    assert r.returncode == 0, r.stderr
    # updating without --model reuses it
    r = _cli_in(tmp_path, "index", "--photos", layout.photos, "--out", moved / "cat")
    assert r.returncode == 0 and "(0 embedded now" in r.stdout, r.stderr
    # another file of that name is not taken for it; gone: one line saying what to pass
    (moved / "best.pt").write_bytes(b"not the same checkpoint")
    r = _cli_in(tmp_path, "identify", "--catalogue", moved / "cat", "--photos", layout.unlabelled, "--out", "r3")
    _one_line_error(r, "was not found with its digest")
    (moved / "best.pt").unlink()
    r = _cli_in(tmp_path, "identify", "--catalogue", moved / "cat", "--photos", layout.unlabelled, "--out", "r3")
    _one_line_error(r, "pass it: --model PATH")


def test_new_catalogue_without_model_names_the_offline_choice(layout, tmp_path):
    r = run_cli("index", "--photos", layout.photos, "--out", tmp_path / "cat")
    _one_line_error(r, "--model frozen:efficientnet-lite0")
    assert "best.pt" in r.stderr and "kaggle" not in r.stderr.lower()


# --- 6. jk.identify takes paths --------------------------------------------------------------------


def test_api_identify_takes_paths(layout, tmp_path):
    cat = build_catalogue(read_photos(layout.photos), shared_model(), tmp_path / "cat", progress=False)
    files = sorted(layout.unlabelled.rglob("*.jpg"))[:2]
    res = jk.identify(cat, [str(files[0]), Path(files[1])], model=shared_model(), cache_dir=tmp_path / "q",
                      progress=False)
    assert list(res.table["path"]) == [str(files[0]), str(files[1])]
    with pytest.raises(JaguarKitError, match="nope.jpg: photo not found"):
        jk.identify(cat, ["nope.jpg"], model=shared_model(), progress=False)


# --- 7. one loader for every .npz -----------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit inside the compressed arrays
        data[len(data) // 3] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_catalogue_and_embeddings_files_are_one_line(tmp_path, how):
    x, y = gaussian_embeddings(n_ids=4, per=30, dim=64)
    n = len(y)
    Catalogue([str(i) for i in range(n)], y, [f"{i}.jpg" for i in range(n)], [""] * n, np.full((n, 4), -1), x,
              [bytes(20)] * n, {"source": "x"}).save(tmp_path / "cat")
    _damage(tmp_path / "cat" / "catalogue.npz", how)
    with pytest.raises(JaguarKitError, match=r"cat/catalogue.npz: damaged or not a readable jaguar_kit catalogue") as e:
        load_catalogue(tmp_path / "cat")
    assert "\n" not in str(e.value)
    Embeddings([f"{i}.png" for i in range(n)], x, "m").save(tmp_path / "e.npz")
    _damage(tmp_path / "e.npz", how)
    with pytest.raises(JaguarKitError, match=r"e.npz: damaged or not a jaguar_kit embeddings file") as e:
        Embeddings.load(tmp_path / "e.npz")
    assert "\n" not in str(e.value)
    r = run_cli("score", "--embeddings", tmp_path / "e.npz", "--labels", tmp_path / "none.csv")
    _one_line_error(r, "e.npz: damaged")


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_embedding_chunk_is_recomputed_with_one_line(layout, tmp_path, caplog, how):
    from jaguar_kit.photos.model import embed_photos

    photos = read_photos(layout.photos)[:3]
    _, first, _ = embed_photos(shared_model(), photos, tmp_path, progress=False)
    (chunk,) = (tmp_path / "embeddings").rglob("*.npz")
    _damage(chunk, how)
    with caplog.at_level(logging.INFO):
        _, again, _ = embed_photos(shared_model(), photos, tmp_path, progress=False)
    assert np.allclose(first, again, atol=1e-6)
    said = [r.getMessage() for r in caplog.records if "computing it again" in r.getMessage()]
    assert len(said) == 1 and chunk.name in said[0] and "damaged" in said[0]


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_local_feature_chunk_is_recomputed_with_one_line(competition, tmp_path, caplog, how):
    from jaguar_kit.local import LocalSettings, compute_local_features

    paths = sorted((competition / "train" / "train").glob("*.png"))[:3]
    names = [p.name for p in paths]
    settings = LocalSettings(size=96, max_keypoints=200)
    first = compute_local_features(names, paths, tmp_path, settings, progress=False)
    (chunk,) = tmp_path.glob("local_*.npz")
    _damage(chunk, how)
    with caplog.at_level(logging.INFO):
        again = compute_local_features(names, paths, tmp_path, settings, progress=False)
    assert again.computed_chunks == 1
    assert all(np.array_equal(a.points, b.points) for a, b in zip(first.features, again.features))
    said = [r.getMessage() for r in caplog.records if "computing it again" in r.getMessage()]
    assert len(said) == 1 and chunk.name in said[0]
