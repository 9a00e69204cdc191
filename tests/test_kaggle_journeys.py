"""Kaggle sessions as users live them: the pushed notebooks, executed version after version.

Every test is a journey through tests/kaggle_sim.py's stand-in (read-only inputs, a fresh
working folder and Python per version, the wheel installed by the notebook's own install
cell, no network, only the ``parameters`` cell changed: a tiny CPU model). The versions
build on each other as a user's do, so the module shares them through fixtures.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import jaguar_kit
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
# the cheap inference: test images only (journeys e and f); h and i attach validation and train embeddings
INFER_TEST_ONLY = {**INFER, "VALIDATION": False}
# local features on the 96 px synthetic images at their own size (the default 640 px would upscale them)
SUBMIT_LOCAL = ["retrieval.local_size=96", "retrieval.local_features=150"]


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
    assert f"jaguar_kit {jaguar_kit.__version__} from" in killed_train.log and "site-packages" in killed_train.log  # installed by the cell
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
    killed = kaggle.run("infer", INFER_TEST_ONLY, attach={"train": resumed_train}, fault="chunk-write:2")
    resumed = kaggle.run("infer", INFER_TEST_ONLY, resume=True, attach={"train": resumed_train, "infer": killed})
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


def _assert_valid_submission(version, competition) -> pd.DataFrame:
    df = pd.read_csv(version.output / "submission.csv")
    test = pd.read_csv(competition / "test.csv")
    n = len(set(test["query_image"]))
    assert len(df) == n * (n - 1) == len(test)
    assert list(df.columns) == ["row_id", "similarity"]
    assert list(df["row_id"]) == list(test["row_id"])
    assert df["similarity"].between(0, 1).all() and df["similarity"].notna().all()
    return df


def test_f_submission_from_the_attached_inference(kaggle, competition, resumed_infer):
    _, infer = resumed_infer
    sub = kaggle.run("submit", {}, attach={"infer": infer})
    assert sub.ok, sub.tail()
    _assert_valid_submission(sub, competition)
    assert "kaggle competitions submit -c jaguar-re-id" in sub.log
    # TUNE is on by default; with no validation embeddings attached it says so in one line and goes on
    said = [ln for ln in sub.log.splitlines() if ln.startswith("TUNE: no embeddings_val")]
    assert len(said) == 1 and "VALIDATION = True" in said[0], sub.tail()
    assert not any(f.startswith("tuned/") for f in sub.files())


# --------------------------------------------------------------------------- (g) shipped defaults, offline


def test_g_shipped_defaults_without_weights_or_internet_say_what_to_do_first_before_preparing(kaggle):
    first = kaggle.run("train", {})  # the notebook as pushed: megadescriptor-l-384, weights auto
    assert not first.ok
    assert first.error is not None and first.error.startswith("JaguarKitError: "), first.tail()
    message = first.error.split(": ", 1)[1]
    # the first line is the one thing to do, in Kaggle's words; every alternative is on the lines below
    head, details = message.split("\n", 1)
    assert head.startswith("Attach a copy of the weights (Add Input"), message
    assert "turn on Internet in the notebook's settings" in head and "BVRA/MegaDescriptor-L-384" in head, head
    assert len(head) < 200, head
    for part in ("BVRA/MegaDescriptor-L-384", "Internet", "attach", "--model", "settings cell", "WEIGHTS = \"none\""):
        assert part in details, details
    prepared = [p for p in first.scratch.rglob("*") if p.is_file()] + [
        p for p in first.output.rglob("*") if p.is_file() and "prepared" in p.parts]
    assert prepared == [], prepared[:5]  # failed before any image was prepared


# --------------------------------------------------------------------------- (h) tuned on validation


@pytest.fixture(scope="module")
def validation_infer(kaggle, resumed_train):
    """Inference that also embeds the run's validation fold (VALIDATION) and the train images (what the
    pseudo-label round needs)."""
    return kaggle.run("infer", {**INFER, "VALIDATION": True, "SPLITS": ["test", "train"]},
                      attach={"train": resumed_train})


def test_h_submission_tuned_on_the_attached_validation_embeddings(kaggle, competition, resumed_train,
                                                                  validation_infer):
    from jaguar_kit.config import load_config

    assert validation_infer.ok, validation_infer.tail()
    assert {"embeddings_val_model0.npz", "embeddings_train_model0.npz", "inference.json"} <= validation_infer.files()
    with np.load(validation_infer.output / "embeddings_val_model0.npz") as z:
        assert len(z["names"]) == 12  # the fold the run validated on: 2 of each identity's 6 images

    sub = kaggle.run("submit", {"TUNE": True, "OVERRIDES": SUBMIT_LOCAL},
                     attach={"infer": validation_infer, "train": resumed_train})
    assert sub.ok, sub.tail()
    assert {"tuned/tuned.json", "tuned/tune_table.csv", "tuned/tune_report.json"} <= sub.files()
    tuned = load_config(sub.output / "tuned" / "tuned.json")
    _assert_valid_submission(sub, competition)
    # the printed table and the chosen setting, as tuned.json holds it
    chosen = next(ln for ln in sub.log.splitlines() if ln.startswith("chosen: "))
    described = json.loads(chosen.split(": ", 1)[1])
    assert described["query_expansion_k"] == tuned.retrieval.query_expansion_k
    assert described["rerank"] == tuned.retrieval.rerank and described["local_verify"] == tuned.retrieval.local_verify
    assert re.search(r"tta\s+query_expansion_k\s+rerank\s+k1", sub.log), sub.tail()
    assert "held-out" in sub.log and "the submission uses the chosen settings" in sub.log
    if tuned.retrieval.local_verify:  # the chosen local stage ran on the test images too
        assert any(f.startswith("local_cache/") for f in sub.files())


# --------------------------------------------------------------------------- (i) one pseudo-label round


# the tiny model is barely better than chance on six identities: its calibrated top probability stays near
# 1/6, so the threshold is lowered below it and the test images qualify
PSEUDO = {"TUNE": False, "PSEUDO_LABELS": True, "PSEUDO_THRESHOLD": 0.1, "PSEUDO_EPOCHS": 1}


def _round_status(version) -> dict:
    return json.loads((version.output / "pseudo" / "model0" / "round_status.json").read_text())


@pytest.fixture(scope="module")
def pseudo_submit(kaggle, resumed_train, validation_infer):
    return kaggle.run("submit", PSEUDO, attach={"infer": validation_infer, "train": resumed_train})


def test_i_one_pseudo_label_round_trains_embeds_and_submits(pseudo_submit, competition, resumed_train):
    sub = pseudo_submit
    assert sub.ok, sub.tail()
    found = re.search(r"pseudo-labels: (\d+) of 12 test images", sub.log)
    assert found and int(found.group(1)) > 0, sub.tail()
    files = sub.files()
    assert {"pseudo/model0/pseudo_run/best.pt", "pseudo/model0/pseudo_run/pseudo_round.json",
            "pseudo/model0/pseudo_labels.csv", "pseudo/model0/embeddings_pseudo_test.npz"} <= files, sorted(files)
    assert not any(f.startswith("pseudo/model0/data/") for f in files)  # no links to the inputs kept
    assert not any(f.endswith(".lock") for f in files), sorted(files)
    assert _round_status(sub)["status"] == "finished"
    labels = pd.read_csv(sub.output / "pseudo" / "model0" / "pseudo_labels.csv")
    assert len(labels) == int(found.group(1)) and (labels["probability"] >= 0.1).all()
    round_cfg = _checkpoint(sub.output / "pseudo" / "model0" / "pseudo_run" / "best.pt")["config"]
    assert round_cfg["data"]["fold"] == -1 and round_cfg["train"]["epochs"] == 1
    assert round_cfg["model"]["init_from"].endswith("jaguar-re-id-train/run/best.pt")
    # the submission is the round's model's
    with np.load(sub.output / "pseudo" / "model0" / "embeddings_pseudo_test.npz") as z:
        assert len(z["names"]) == 12 and str(z["model"]).endswith("pseudo/model0/pseudo_run/best.pt")
    _assert_valid_submission(sub, competition)


def test_i_running_again_reuses_the_round_and_starts_no_second(kaggle, competition, resumed_train, validation_infer,
                                                               pseudo_submit):
    again = kaggle.run("submit", PSEUDO, resume=True,
                       attach={"infer": validation_infer, "train": resumed_train, "submit": pseudo_submit})
    assert again.ok, again.tail()
    assert "a pseudo-label round already ran" in again.log and "only one round" in again.log, again.tail()
    assert not re.search(r"^epoch \d+:", again.log, re.MULTILINE), again.tail()  # nothing trained
    best = "pseudo/model0/pseudo_run/best.pt"
    assert best in again.files()  # republished: this version's output is complete by itself
    assert not any(f.endswith(".lock") for f in again.files()), sorted(again.files())
    assert (again.output / best).read_bytes() == (pseudo_submit.output / best).read_bytes()
    before = pd.read_csv(pseudo_submit.output / "submission.csv")
    after = _assert_valid_submission(again, competition)
    np.testing.assert_allclose(after["similarity"], before["similarity"], atol=1e-6)  # the same model submits


# --------------------------------------------------------------------------- (j) a pseudo round killed, then rerun


@pytest.fixture(scope="module")
def killed_round(kaggle, resumed_train, validation_infer):
    settings = {**PSEUDO, "PSEUDO_EPOCHS": 2}
    inputs = {"infer": validation_infer, "train": resumed_train}
    # the round's 4 steps an epoch: the 6th is in epoch 2, after epoch 1's checkpoints (best.pt included)
    killed = kaggle.run("submit", settings, attach=inputs, fault="train-step:6")
    rerun = kaggle.run("submit", settings, resume=True, attach={**inputs, "submit": killed})
    return killed, rerun


def test_j_a_killed_pseudo_label_round_resumes_in_the_next_version_and_only_then_submits(killed_round, competition):
    killed, rerun = killed_round
    run = "pseudo/model0/pseudo_run"
    assert not killed.ok, killed.tail()
    assert "submission.csv" not in killed.files(), killed.tail()  # nothing submitted from a 1-epoch model
    assert {f"{run}/last.pt", f"{run}/best.pt"} <= killed.files(), sorted(killed.files())
    assert _round_status(killed)["status"] == "started" and _checkpoint(killed.output / run / "last.pt")["epoch"] == 1
    assert not any(f.startswith("pseudo/model0/data/") for f in killed.files())  # no links to the inputs

    assert rerun.ok, rerun.tail()
    assert "a pseudo-label round already ran" not in rerun.log, rerun.tail()  # not taken for a finished round
    assert "resuming the round started in" in rerun.log and "resuming the run attached at" in rerun.log, rerun.tail()
    assert re.findall(r"^epoch (\d+):", rerun.log, re.MULTILINE) == ["2"], rerun.tail()  # epoch 1 was not retrained
    status = _round_status(rerun)
    assert status["status"] == "finished" and status["epochs_done"] == 2 == status["epochs"]
    assert [int(e) for e in pd.read_csv(rerun.output / run / "metrics.csv")["epoch"]] == [1, 2]
    best = _checkpoint(rerun.output / run / "best.pt")
    assert best["status"] == "finished" and best["epoch"] == 2
    assert not any(f.endswith(".lock") for f in rerun.files()), sorted(rerun.files())  # no lock published
    with np.load(rerun.output / "pseudo" / "model0" / "embeddings_pseudo_test.npz") as z:
        assert str(z["model"]).endswith(f"{run}/best.pt")
    _assert_valid_submission(rerun, competition)


# --------------------------------------------------------------------------- (k) another fold on an attached run


def test_k_a_version_with_changed_settings_is_refused_in_notebook_words_before_copying(kaggle, resumed_train):
    other = kaggle.run("train", {**_train_parameters(epochs=3), "FOLD": 1}, resume=True,
                       attach={"train": resumed_train})
    assert not other.ok and other.error.startswith("JaguarKitError: "), other.tail()
    message = other.error.split(": ", 1)[1]
    assert "another config" in message and "data.fold: 0 -> 1" in message, message
    assert "settings cell" in message and "--out" not in message and "--set" not in message, message
    assert not any(f.startswith("run/") for f in other.files()), sorted(other.files())  # nothing copied in
