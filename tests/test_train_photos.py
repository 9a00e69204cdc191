"""Learning from your own photos: train --photos, index with its best.pt, re-index a catalogue with it."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal

import cv2
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, run_cli
from jaguar_kit.files import file_sha256
from jaguar_kit.photos.catalogue import load_catalogue
from jaguar_kit.train.checkpoint import load_checkpoint
from photo_layouts import MODEL, make_layout

TRAIN = [*TINY_OVERRIDES, "train.checkpoint_every=1"]
KEY = re.compile(r"[0-9a-f]{32}(-\d+){0,4}\.(jpg|png)")  # a content key, never an individual's name


def train_photos(source, out, *overrides, fault=None):
    return run_cli("train", "--photos", source, "--out", out, overrides=[*TRAIN, *overrides], fault=fault)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _table(run):
    with open(run / "photos_data" / "train.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def layout(competition, tmp_path_factory):
    return make_layout(competition, tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def frozen_catalogue(layout, tmp_path_factory):
    """The loop's first step: the photos of the CSV (boxes in larger frames) indexed with the frozen backbone."""
    out = tmp_path_factory.mktemp("frozen") / "catalogue"
    _ok(run_cli("index", "--photos", layout.csv, "--model", MODEL, "--prepared-size", "96", "--out", out))
    return out


@pytest.fixture(scope="module")
def csv_run(layout, tmp_path_factory):
    run = tmp_path_factory.mktemp("csv") / "run"
    _ok(train_photos(layout.csv, run))
    return run


def test_train_on_a_folder_per_individual_then_index_with_its_best_pt(layout, tmp_path):
    run = tmp_path / "run"
    proc = _ok(train_photos(layout.photos, run))
    assert "val mAP" in proc.stdout  # validated on a split of the photos, as any training run
    rows = _table(run)
    assert sorted({r["ground_truth"] for r in rows}) == sorted(layout.known)
    assert len(rows) == sum(1 for p in layout.photos.rglob("*") if p.is_file())
    assert all(KEY.fullmatch(r["filename"]) for r in rows)  # names never become paths
    assert sorted(p.name for p in (run / "photos_data" / "train").iterdir()) == sorted(r["filename"] for r in rows)

    cat = tmp_path / "catalogue"
    _ok(run_cli("index", "--photos", layout.photos, "--model", run / "best.pt", "--out", cat))
    model = json.loads((cat / "catalogue.json").read_text())["model"]
    assert model["source"] == str((run / "best.pt").resolve())
    assert model["file_sha256"] == file_sha256(run / "best.pt")
    assert model["prepared_size"] == 96  # the run's own preprocessing


def test_train_on_a_csv_with_boxes_trains_on_the_boxed_animals(layout, csv_run):
    with open(layout.csv, newline="") as fh:
        listed = list(csv.DictReader(fh))
    rows = _table(csv_run)
    assert len(rows) == len(listed)
    for r in rows:  # each image the engine read is the box cut out of its larger frame
        w, h = map(int, r["filename"].split(".")[0].split("-")[-2:])
        assert cv2.imread(str(csv_run / "photos_data" / "train" / r["filename"])).shape[:2] == (h, w)
    frame = cv2.imread(str(layout.csv.parent / listed[0]["path"]))
    assert frame.shape[0] > int(listed[0]["h"]) and frame.shape[1] > int(listed[0]["w"])
    assert (csv_run / "best.pt").is_file() and (csv_run / "metrics.csv").is_file()


def test_killed_training_on_a_catalogue_resumes_when_the_same_command_is_rerun(frozen_catalogue, layout, tmp_path):
    run = tmp_path / "run"
    killed = train_photos(frozen_catalogue, run, fault="train-step:3")  # a real SIGKILL after step 3
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "last.pt")["status"] == "running"
    data = run / "photos_data"
    written = {p: p.stat().st_mtime_ns for p in [data / "train.csv", *(data / "train").iterdir()]}
    assert {r["ground_truth"] for r in _table(run)} == set(load_catalogue(frozen_catalogue).identities)

    resumed = _ok(train_photos(frozen_catalogue, run))
    assert "resumed" in resumed.stdout
    state = load_checkpoint(run / "last.pt")
    assert state["status"] == "finished" and state["epoch"] == 2
    assert {p: p.stat().st_mtime_ns for p in written} == written  # the photos were reused, not rewritten

    # other photos into the same run: the engine's resume check names the change, nothing is trained over
    _one_line_error(train_photos(layout.photos, run), "train.csv changed", "accept_data_change")
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_bad_photo_sets_are_refused_in_one_line(layout, tmp_path):
    flat = tmp_path / "flat"  # photos but no sub-folder per individual
    flat.mkdir()
    for p in sorted((layout.photos / layout.known[0]).glob("*.png")):
        (flat / p.name).write_bytes(p.read_bytes())
    _one_line_error(train_photos(flat, tmp_path / "r1"), "no individual", "sub-folder named after the individual")

    one = tmp_path / "one" / layout.known[0]  # a single individual: nothing to tell apart
    shutil.copytree(layout.photos / layout.known[0], one)
    _one_line_error(train_photos(one.parent, tmp_path / "r2"), "at least 2 individuals with at least 2 photos")

    # 4 photos per individual over 5 folds: no individual twice among the validation photos, refused before training
    _one_line_error(train_photos(layout.photos, tmp_path / "r4", "data.num_folds=5"), "validation has nothing to score",
                    "data.num_folds=2", "data.fold=-1")
    assert not (tmp_path / "r4" / "last.pt").exists()

    bad_csv = tmp_path / "frames.csv"
    rows = list(csv.reader(open(layout.csv, newline="")))
    rows[3][2:4] = ["5000", "10"]  # x beyond the frame's width
    with open(bad_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    for row in rows[1:]:
        (tmp_path / row[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row[0]).write_bytes((layout.csv.parent / row[0]).read_bytes())
    _one_line_error(train_photos(bad_csv, tmp_path / "r3"), f"{bad_csv} line 4", "outside the")
    assert not (tmp_path / "r3" / "last.pt").exists()


def test_reindex_a_catalogue_with_the_trained_model_into_a_new_catalogue(frozen_catalogue, csv_run, layout, tmp_path):
    before = (frozen_catalogue / "catalogue.npz").read_bytes()
    new = tmp_path / "better"
    proc = _ok(run_cli("index", "--catalogue", frozen_catalogue, "--model", csv_run / "best.pt", "--out", new))
    assert f"{len(load_catalogue(frozen_catalogue))} embedded now" in proc.stdout
    old_cat, new_cat = load_catalogue(frozen_catalogue), load_catalogue(new)
    assert (frozen_catalogue / "catalogue.npz").read_bytes() == before  # the old catalogue is left as it is
    assert sorted(zip(new_cat.keys, new_cat.identities)) == sorted(zip(old_cat.keys, old_cat.identities))
    assert sorted(map(tuple, new_cat.boxes)) == sorted(map(tuple, old_cat.boxes))  # the same boxed animals
    assert new_cat.model["source"] == str((csv_run / "best.pt").resolve())
    assert new_cat.embeddings.shape[1] == 32 != old_cat.embeddings.shape[1]  # embedded by the new model

    _one_line_error(run_cli("index", "--catalogue", frozen_catalogue, "--model", csv_run / "best.pt",
                            "--out", frozen_catalogue), "writes a new catalogue", "another --out")
    assert (frozen_catalogue / "catalogue.npz").read_bytes() == before

    # the loop's last step: identify with the re-indexed catalogue
    result = tmp_path / "results"
    _ok(run_cli("identify", "--catalogue", new, "--photos", layout.unlabelled, "--out", result))
    assert (result / "identify.csv").is_file()
    assert np.isfinite(new_cat.embeddings).all()
