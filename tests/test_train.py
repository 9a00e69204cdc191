"""The training engine: run folder, exact resume after real kills, early stopping, budgets."""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_OVERRIDES, checkpoint_weights, cli_command, cli_env, run_cli, train_cli
from jaguar_kit.config import apply_overrides
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.train.checkpoint import load_checkpoint
from jaguar_kit.train.engine import train
from jaguar_kit.train.launch import train_folds
from jaguar_kit.train.state import EarlyStopping


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_run_folder_holds_config_metrics_curves_and_two_checkpoints(reference_run):
    assert sorted(p.name for p in reference_run.iterdir()) == [
        "best.pt", "config.json", "curves.png", "last.pt", "metrics.csv"]
    metrics = pd.read_csv(reference_run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]  # random initial weights: no frozen baseline at epoch 0
    assert metrics["val_map"].between(0, 1).all()
    assert {"arcface", "triplet"} <= set(metrics.columns)  # the loss parts the criterion returns
    state = load_checkpoint(reference_run / "last.pt")
    assert state["status"] == "finished" and state["epoch"] == 2
    assert set(state["stopper"]) == {"best", "best_epoch", "bad_epochs", "recent"}


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(competition, reference_run, tmp_path):
    out = tmp_path / "run"
    killed = train_cli(competition, out, fault="train-step:3")  # a real SIGKILL after step 3
    assert killed.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 0 and state["next_batch"] == 2  # mid-epoch
    resumed = train_cli(competition, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    _assert_bitwise_equal(checkpoint_weights(out / "last.pt"), checkpoint_weights(reference_run / "last.pt"))
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "metrics.csv").drop(columns="elapsed_s"),
        pd.read_csv(reference_run / "metrics.csv").drop(columns="elapsed_s"))


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(competition, tmp_path):
    out = tmp_path / "run"
    killed = train_cli(competition, out, fault="checkpoint-write:3")
    assert killed.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "last.pt")  # the second write survived the third's death
    assert state["global_step"] == 2
    assert any(p.name.startswith(".last.pt.tmp-") for p in out.iterdir())  # the half-written file
    resumed = train_cli(competition, out)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(".tmp-" in p.name for p in out.iterdir())  # stale temporaries are cleared on resume


def test_sigterm_stops_cleanly_and_resumes(competition, reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = cli_command("train", "--data", competition, "--out", out, overrides=[*TINY_OVERRIDES, "train.epochs=40"])
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # `train && embed` must not go on
    assert "stopped cleanly (SIGTERM)" in stdout and "Traceback" not in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["status"] == "running" and state["epoch"] < 40


def test_time_budget_stop_then_resume_equals_uninterrupted(competition, tiny_config, reference_run, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.checkpoint_every = 1
    cfg.train.time_budget_h = 1e-9  # stops after the first optimiser step
    first = train(cfg, competition, tmp_path / "run", progress=False, resume_roots=[])
    assert first.status == "interrupted"
    cfg.train.time_budget_h = 11.5
    second = train(cfg, competition, tmp_path / "run", progress=False, resume_roots=[])
    assert second.status == "finished"
    _assert_bitwise_equal(checkpoint_weights(tmp_path / "run" / "last.pt"), checkpoint_weights(reference_run / "last.pt"))


def test_finished_run_is_not_retrained_and_other_config_is_refused(competition, tiny_config, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = (out / "last.pt").stat().st_mtime_ns
    result = train(tiny_config, competition, out, progress=False, resume_roots=[])
    assert result.status == "finished" and (out / "last.pt").stat().st_mtime_ns == before
    other = apply_overrides(copy.deepcopy(tiny_config), ["train.lr=0.5"])
    with pytest.raises(JaguarKitError, match="another config"):
        train(other, competition, out, progress=False, resume_roots=[])


def test_resume_discovers_previous_session_output(competition, tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.checkpoint_every = 1
    cfg.train.time_budget_h = 1e-9
    train(cfg, competition, tmp_path / "session1" / "run", progress=False, resume_roots=[])
    # the next kernel session sees the previous output read-only under its inputs
    attached = tmp_path / "input" / "my-train-kernel"
    shutil.copytree(tmp_path / "session1", attached)
    cfg.train.time_budget_h = 11.5
    result = train(cfg, competition, tmp_path / "session2" / "run", progress=False, resume_roots=[tmp_path / "input"])
    assert result.status == "finished"
    assert load_checkpoint(tmp_path / "session2" / "run" / "last.pt")["global_step"] == 8


def test_an_attached_run_of_another_config_is_refused_before_anything_is_copied(competition, tiny_config, tmp_path,
                                                                                 monkeypatch):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.time_budget_h = 1e-9  # one optimiser step, then a clean stop: last.pt of a running run
    train(cfg, competition, tmp_path / "session1" / "run", progress=False, resume_roots=[])
    shutil.copytree(tmp_path / "session1", tmp_path / "input" / "my-train-kernel")
    other = apply_overrides(copy.deepcopy(tiny_config), ["data.fold=1"])  # a version whose settings changed
    out = tmp_path / "session2" / "run"
    with pytest.raises(JaguarKitError, match="another config.*data.fold: 0 -> 1") as e:
        train(other, competition, out, progress=False, resume_roots=[tmp_path / "input"])
    assert "--out" in str(e.value) and "train.resume=never" in str(e.value)  # command-line advice off Kaggle
    assert not any(p.is_file() and p.name != ".lock" for p in out.parent.rglob("*")), sorted(out.parent.rglob("*"))
    # inside a Kaggle notebook the same refusal speaks of the notebook: its settings cell and its inputs
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    with pytest.raises(JaguarKitError, match="another config") as e:
        train(other, competition, out, progress=False, resume_roots=[tmp_path / "input"])
    assert "settings cell" in str(e.value) and "Input panel" in str(e.value) and "--out" not in str(e.value)
    assert not (out / "last.pt").exists()


def test_early_stopping_state():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(0.5, 1) and not es.should_stop
    assert not es.update(0.505, 2)  # within min_delta: not an improvement
    assert not es.update(0.4, 3) and es.should_stop
    restored = EarlyStopping(2, 0.01)
    restored.load_state_dict(es.state_dict())
    assert restored.should_stop and restored.best == 0.5 and restored.best_epoch == 1


def test_cross_validation_folds_and_backbone_init_from_another_run(competition, tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.epochs = 1
    results = train_folds(cfg, competition, tmp_path / "cv", folds=[0, 1], progress=False)
    assert [r.status for r in results] == ["finished", "finished"]
    assert (tmp_path / "cv" / "fold1" / "best.pt").is_file()
    # a variant with another embedding size starts from fold 0's backbone
    variant = apply_overrides(copy.deepcopy(cfg), [f"model.init_from={tmp_path / 'cv' / 'fold0' / 'best.pt'}",
                                                   "model.embedding_dim=16"])
    r = train(variant, competition, tmp_path / "variant", prepared_root=tmp_path / "cv" / "prepared",
              progress=False, resume_roots=[])
    assert r.status == "finished"
    # a pretrained start: epoch 0 scores its frozen backbone on the same validation images
    metrics = pd.read_csv(tmp_path / "variant" / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1] and metrics["train_loss"].isna().tolist() == [True, False]
    assert r.frozen_map == metrics["val_map"].iloc[0] and 0 <= r.frozen_map <= 1
    assert "frozen backbone" in r.summary()


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_gloo(competition, tmp_path):
    out = tmp_path / "ddp"
    # through the launcher the training kernel uses on Kaggle's T4 x2 (torchrun in a subprocess)
    proc = run_cli("train", "--gpus", "2", "--data", competition, "--out", out,
                   overrides=[*TINY_OVERRIDES, "train.epochs=1"], OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["status"] == "finished" and state["global_step"] == 4
    assert proc.stdout.count("training on") == 1  # only rank 0 reports and writes
    assert proc.stdout.count("finished after 1 epochs") == 1 and "n/a" not in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv"]


# --- encounters ------------------------------------------------------------------------------


def test_training_and_inference_share_one_split_that_never_splits_an_encounter(competition, tiny_config, tmp_path):
    """train.csv names encounters: the run records them, and the engine and `embed --split val` hold out
    the same images, whole encounters only."""
    from jaguar_kit.pipeline import split_images
    from jaguar_kit.data.encounters import train_encounters
    from jaguar_kit.train.runs import _fold_data, training_table

    data = tmp_path / "data"
    shutil.copytree(competition, data)
    train_csv = pd.read_csv(data / "train.csv", dtype=str)
    train_csv["encounter"] = train_csv.groupby("ground_truth").cumcount().floordiv(3).astype(str)  # bursts of 3
    train_csv["encounter"] = train_csv["ground_truth"] + "/" + train_csv["encounter"]
    train_csv.to_csv(data / "train.csv", index=False)
    comp, _ = training_table(data)
    encounters = dict(zip(train_csv["filename"], train_csv["encounter"]))
    assert dict(zip(comp.train["filename"], train_encounters(comp.train))) == encounters
    fold = _fold_data(tiny_config, comp, tmp_path / "prepared", False, encounters)
    enc = train_csv["encounter"].to_numpy()
    assert len(fold.val_idx) and not set(enc[fold.train_idx]) & set(enc[fold.val_idx])
    names, _, _ = split_images(tiny_config, data, "val")
    assert names == list(train_csv["filename"].to_numpy()[fold.val_idx])  # inference validates on the same images
    cfg = copy.deepcopy(tiny_config)
    cfg.train.time_budget_h = 1e-9  # one step, then a clean stop: enough to write last.pt
    train(cfg, data, tmp_path / "run", prepared_root=tmp_path / "prepared", progress=False, resume_roots=[])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["data"]["encounters"] == encounters  # recorded in the run


def _history(gain: float, noise: float, seed: int = 0) -> list[dict]:
    """Epoch 0 (frozen) and epoch 3 (fine-tuned) with per-identity validation mAPs of 40 identities."""
    from jaguar_kit.train.checkpoint import VAL_BY_IDENTITY

    rng = np.random.default_rng(seed)
    frozen = rng.uniform(0.05, 0.5, 40)
    tuned = np.clip(frozen + gain + rng.normal(0, noise, 40), 0, 1)
    return [{"epoch": 0, "val_map": float(frozen.mean()), VAL_BY_IDENTITY: frozen.tolist()},
            {"epoch": 3, "val_map": float(tuned.mean()), VAL_BY_IDENTITY: tuned.tolist()}]


def test_fine_tuning_is_kept_only_when_it_beats_the_frozen_backbone_beyond_the_noise(reference_run, tmp_path):
    """A higher validation mean is not enough: a +0.017 that the identities' noise (sd 0.08) could give by
    chance keeps the frozen backbone and says why; a clear gain keeps the fine-tuned model."""
    from jaguar_kit.train.checkpoint import fine_tuning_verdict, model_source

    lucky = _history(gain=0.01, noise=0.08, seed=2)  # measured +0.017, 90% interval -0.006 to +0.039
    assert lucky[1]["val_map"] > lucky[0]["val_map"]  # the old rule would have kept it
    keep, why = fine_tuning_verdict(lucky, 3, lucky[1]["val_map"])
    assert not keep and "beyond the noise" in why and "90% interval" in why
    clear = _history(gain=0.05, noise=0.03)
    keep, why = fine_tuning_verdict(clear, 3, clear[1]["val_map"])
    assert keep and "beats the frozen backbone by +0.05" in why
    # model_source (what the infer kernel's FROZEN_IF_BETTER reads) and the run's summary follow the same rule
    state = load_checkpoint(reference_run / "best.pt")
    state["stopper"] = {**state["stopper"], "best_epoch": 3}
    for history, expected in ((lucky, "frozen:tiny-cnn"), (clear, str(tmp_path / "best.pt"))):
        state["history"] = history
        torch.save(state, tmp_path / "best.pt")
        assert model_source(tmp_path / "best.pt") == expected
    from jaguar_kit.train.state import TrainResult

    summary = TrainResult(tmp_path, "finished", 3, lucky[1]["val_map"], lucky, lucky[0]["val_map"], "", 3).summary()
    assert "does not beat the frozen backbone beyond the noise" in summary and "embed with frozen:BACKBONE" in summary
