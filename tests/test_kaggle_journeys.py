"""Kaggle sessions as users live them: the pushed notebooks, executed version after version.

Every test is a journey through tests/kaggle_sim.py's stand-in (read-only inputs, a fresh
working folder and Python per version, the wheel installed by the notebook's own install
cell, no network, only the ``parameters`` cell changed: a tiny CPU model). The versions
build on each other as a user's do, so the module shares them through fixtures.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_OVERRIDES
from kaggle_sim import KaggleSim, build_wheel_dataset

pytestmark = pytest.mark.slow

RUN_FILES = {"run/best.pt", "run/last.pt", "run/metrics.csv", "run/config.json", "run/curves.png"}
TEST_CHUNKS = 3  # 12 test images (6 identities x 2) in chunks of 4


def _train_parameters(epochs: int) -> dict:
    """The settings cell a user would fill for a tiny CPU run."""
    named = {"model.backbone", "model.weights", "train.epochs"}
    return {"BACKBONE": "tiny-cnn", "WEIGHTS": "none", "EPOCHS": epochs,
            "OVERRIDES": [o for o in TINY_OVERRIDES if o.split("=")[0] not in named]}


INFER = {"OVERRIDES": ["embed.chunk_size=4", "embed.batch_size=8", "data.workers=0"]}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory, competition) -> KaggleSim:
    wheel = build_wheel_dataset(tmp_path_factory.mktemp("wheel") / "jaguar-kit-wheel")
    return KaggleSim(tmp_path_factory.mktemp("kaggle"), wheel, competition)


def _epochs(version) -> list[int]:
    """The trained epochs in the run's metrics.csv (epoch 0 is the pretrained baseline's row)."""
    return [int(e) for e in pd.read_csv(version.output / "run" / "metrics.csv")["epoch"] if e > 0]


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def killed_train(kaggle):
    # 4 steps an epoch: the 6th step is in epoch 2, after epoch 1's checkpoint
    return kaggle.run("train", _train_parameters(epochs=3), fault="train-step:6")


@pytest.fixture(scope="module")
def resumed_train(kaggle, killed_train):
    return kaggle.run("train", _train_parameters(epochs=3), resume=True, attach={"train": killed_train})


@pytest.fixture(scope="module")
def first_infer(kaggle, resumed_train):
    return kaggle.run("infer", {**INFER, "MEASURE_TTA": True}, attach={"train": resumed_train})


# --------------------------------------------------------------------------- (a) killed, then resumed


def test_a_killed_training_resumes_in_the_next_version_and_hands_over_the_whole_run(killed_train, resumed_train):
    assert not killed_train.ok, killed_train.tail()
    assert "jaguar_kit 0.1.0 from" in killed_train.log and "site-packages" in killed_train.log  # installed by the cell
    assert "run/last.pt" in killed_train.files(), killed_train.tail()  # the first checkpoint was kept
    assert _checkpoint(killed_train.output / "run" / "last.pt")["status"] == "running"

    assert resumed_train.ok, resumed_train.tail()
    assert "resumed" in resumed_train.log, resumed_train.tail()
    assert RUN_FILES <= resumed_train.files(), sorted(resumed_train.files())  # its output alone is complete
    assert _epochs(resumed_train) == [1, 2, 3]
    assert _checkpoint(resumed_train.output / "run" / "last.pt")["status"] == "finished"
    # the prepared-image cache stayed out of the output (it would bloat every version)
    assert not any("prepared" in f for f in resumed_train.files())
    assert any(p.is_file() for p in (resumed_train.scratch / "jaguar_kit" / "prepared").rglob("*"))


# --------------------------------------------------------------------------- (b) inference on the resumed version


def test_b_inference_with_only_the_resumed_version_attached(first_infer, resumed_train):
    assert set(first_infer.inputs) == {"jaguar-re-id", "alice/jaguar-kit-wheel", "alice/jaguar-re-id-train"}
    assert first_infer.ok, first_infer.tail()
    files = first_infer.files()
    assert "embeddings_test_model0.npz" in files and not any("embeddings_train" in f for f in files)
    with np.load(first_infer.output / "embeddings_test_model0.npz") as z:
        assert len(z["names"]) == 12
    # only test images were embedded for the submission (the TTA measurement embeds the fold's validation)
    chunks = [f.rsplit("/", 1)[-1] for f in files if f.startswith("cache/")]
    assert chunks and all(c.startswith(("test-", "val-")) for c in chunks) and not any(c.startswith("train-")
                                                                                     for c in chunks)
    # the measurement the kernel offers for TTA: one mAP line per choice, on the real validation fold
    measured = re.findall(r"TTA (none|hflip|flip4)\s*: validation mAP (\d\.\d{4})", first_infer.log)
    assert [m[0] for m in measured] == ["none", "hflip", "flip4"], first_infer.tail()


# --------------------------------------------------------------------------- (c) a finished run attached again


def test_c_a_version_on_the_finished_run_reports_and_republishes_it(kaggle, resumed_train):
    again = kaggle.run("train", _train_parameters(epochs=3), resume=True, attach={"train": resumed_train})
    assert again.ok, again.tail()
    assert "finished" in again.log, again.tail()
    assert RUN_FILES <= again.files(), sorted(again.files())
    assert _epochs(again) == [1, 2, 3]
    assert (again.output / "run" / "best.pt").read_bytes() == (resumed_train.output / "run" / "best.pt").read_bytes()


# --------------------------------------------------------------------------- (d) more epochs extend the run


def test_d_raising_epochs_extends_the_finished_run(kaggle, resumed_train):
    longer = kaggle.run("train", _train_parameters(epochs=4), resume=True, attach={"train": resumed_train})
    assert longer.ok, longer.tail()
    assert _epochs(longer) == [1, 2, 3, 4], longer.tail()
    assert RUN_FILES <= longer.files()
    assert _checkpoint(longer.output / "run" / "last.pt")["status"] == "finished"
    # the first three epochs are the attached run's, not retrained
    before = pd.read_csv(resumed_train.output / "run" / "metrics.csv")
    after = pd.read_csv(longer.output / "run" / "metrics.csv")
    pd.testing.assert_frame_equal(after.iloc[: len(before)][before.columns], before, check_dtype=False)


# --------------------------------------------------------------------------- (e) inference killed and resumed


@pytest.fixture(scope="module")
def resumed_infer(kaggle, resumed_train, first_infer):
    killed = kaggle.run("infer", INFER, attach={"train": resumed_train}, fault="chunk-write:2")
    resumed = kaggle.run("infer", INFER, resume=True, attach={"train": resumed_train, "infer": killed})
    return killed, resumed


def _test_chunks(version) -> dict[str, bytes]:
    return {f.rsplit("/", 1)[-1]: (version.output / f).read_bytes()
            for f in version.files() if f.startswith("cache/") and f.rsplit("/", 1)[-1].startswith("test-")}


def test_e_killed_inference_resumes_reusing_finished_chunks(resumed_infer):
    killed, resumed = resumed_infer
    assert not killed.ok and "embeddings_test_model0.npz" not in killed.files(), killed.tail()
    done = _test_chunks(killed)
    assert len(done) == 1, sorted(killed.files())  # the second chunk died in its write
    assert resumed.ok, resumed.tail()
    assert "alice/jaguar-re-id-infer" in resumed.inputs
    now = _test_chunks(resumed)
    assert len(now) == TEST_CHUNKS
    # reused, not recomputed: the finished chunk is byte for byte the killed version's (a recomputed
    # .npz would carry a new zip timestamp: the versions ran seconds apart)
    reused = [name for name, data in done.items() if now.get(name) == data]
    assert reused == list(done), "finished chunks were recomputed"
    with np.load(resumed.output / "embeddings_test_model0.npz") as z:
        assert len(z["names"]) == 12


# --------------------------------------------------------------------------- (f) submission


def test_f_submission_from_the_attached_inference(kaggle, competition, resumed_infer):
    _, infer = resumed_infer
    sub = kaggle.run("submit", {}, attach={"infer": infer})
    assert sub.ok, sub.tail()
    df = pd.read_csv(sub.output / "submission.csv")
    test = pd.read_csv(competition / "test.csv")
    n = len(set(test["query_image"]))
    assert len(df) == n * (n - 1) == len(test)
    assert list(df.columns) == ["row_id", "similarity"]
    assert list(df["row_id"]) == list(test["row_id"])
    assert df["similarity"].between(0, 1).all() and df["similarity"].notna().all()
    assert "kaggle competitions submit -c jaguar-re-id" in sub.log


# --------------------------------------------------------------------------- (g) shipped defaults, offline


def test_g_shipped_defaults_without_weights_or_internet_fail_in_one_line_before_preparing(kaggle):
    first = kaggle.run("train", {})  # the notebook as pushed: megadescriptor-l-384, weights auto
    assert not first.ok
    assert first.error is not None and first.error.startswith("JaguarKitError: "), first.tail()
    message = first.error.split(": ", 1)[1]
    assert "\n" not in message
    for part in ("BVRA/MegaDescriptor-L-384", "Internet", "attach", "--model"):
        assert part in message, message
    prepared = [p for p in first.scratch.rglob("*") if p.is_file()] + [
        p for p in first.output.rglob("*") if p.is_file() and "prepared" in p.parts]
    assert prepared == [], prepared[:5]  # failed before any image was prepared
