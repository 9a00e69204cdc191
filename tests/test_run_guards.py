"""What training never loses and never gets silently wrong: Ctrl-C, divergence, changed
settings or data on resume, two writers, damaged checkpoints, the GPU memory probe."""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch

from conftest import TINY_OVERRIDES, checkpoint_weights, cli_command, cli_env, run_cli, train_cli
from jaguar_kit.config import apply_overrides
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.train import engine, memory
from jaguar_kit.train.checkpoint import load_checkpoint, non_finite_tensors
from jaguar_kit.train.engine import train
from jaguar_kit.train.memory import fit_batch, probe_step
from jaguar_kit.train.state import TrainModule


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_mid_epoch_saves_the_step_and_resumes_bitwise_equal(competition, reference_run, tmp_path):
    out = tmp_path / "run"
    # a real SIGINT (what Ctrl-C and Jupyter's Interrupt send) delivered right after step 3
    stopped = run_cli("train", "--data", competition, "--out", out, overrides=TINY_OVERRIDES, fault="train-step:3:SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "stopped cleanly (SIGINT) at epoch 1, batch 3" in stopped.stdout
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["next_batch"], state["global_step"]) == (0, 3, 3)
    resumed = train_cli(competition, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "epoch 0, batch 3" in resumed.stdout
    a, b = checkpoint_weights(out / "last.pt"), checkpoint_weights(reference_run / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_from_the_terminal_stops_cleanly_with_loader_workers(competition, tmp_path):
    out = tmp_path / "run"
    cmd = cli_command("train", "--data", competition, "--out", out,
                      overrides=[*TINY_OVERRIDES, "train.epochs=40", "data.workers=1"])
    # its own process group, like a shell job: Ctrl-C reaches the trainer and its loader workers
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    import os

    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped cleanly (SIGINT)" in stdout and "Traceback" not in stderr
    state = load_checkpoint(out / "last.pt")
    assert state["status"] == "running" and state["epoch"] < 40
    assert not (out / ".lock").exists()


# --- divergence -----------------------------------------------------------------------------


@pytest.mark.parametrize("fold", ["-1", "0"])
def test_divergence_stops_in_one_line_and_never_saves_non_finitecheckpoint_weights(competition, tmp_path, fold):
    out = tmp_path / "run"
    proc = train_cli(competition, out, "train.lr=1e6", f"data.fold={fold}", "train.warmup_epochs=0")
    line = _one_line_error(proc, "diverged", "train.lr=1e+06", "last.pt keeps the last finite state")
    assert "step" in line
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert non_finite_tensors(load_checkpoint(out / name)) == []
    assert "*best*" not in proc.stdout


# --- settings that cannot train --------------------------------------------------------------


@pytest.mark.parametrize("setting, needle", [
    ("train.p=1", "train.p=1"), ("train.k=1", "train.k=1"), ("train.epochs=0", "train.epochs=0")])
def test_settings_that_cannot_train_are_refused_before_any_work(competition, tmp_path, setting, needle):
    proc = run_cli("train", "--data", competition, "--out", tmp_path / "run", overrides=[*TINY_OVERRIDES, setting],
                   JAGUAR_KIT_PREPARED=str(tmp_path / "prepared"))
    _one_line_error(proc, needle)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_single_identity_is_refused(competition, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(competition, data)
    table = pd.read_csv(data / "train.csv")
    table[table["ground_truth"] == table["ground_truth"].iloc[0]].to_csv(data / "train.csv", index=False)
    _one_line_error(train_cli(data, tmp_path / "run"), "only 1 identity")


# --- resuming: settings and data ------------------------------------------------------------


def test_raising_epochs_extends_a_finished_run_and_other_changes_are_refused_by_name(competition, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    refused = train_cli(competition, out, "train.lr=0.5", "loss.arcface_margin=0.3")
    _one_line_error(refused, "train.lr: 0.001 -> 0.5", "loss.arcface_margin: 0.5 -> 0.3")
    extended = train_cli(competition, out, "train.epochs=3")
    assert extended.returncode == 0, extended.stderr
    assert "extending to 3 epochs" in extended.stdout
    state = load_checkpoint(out / "last.pt")
    assert state["status"] == "finished" and state["epoch"] == 3
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3]


def test_a_run_attached_from_a_previous_version_is_brought_over_whole(competition, reference_run, tmp_path):
    attached = tmp_path / "input" / "notebooks" / "me" / "train-kernel" / "run"
    shutil.copytree(reference_run, attached)
    out = tmp_path / "working" / "run"
    result = train(apply_overrides(engine.Config(), TINY_OVERRIDES), competition, out, progress=False,
                   resume_roots=[tmp_path / "input"])
    assert result.status == "finished" and result.best_map is not None
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv"]
    assert (out / "best.pt").read_bytes() == (attached / "best.pt").read_bytes()


def test_an_attached_run_with_other_settings_is_refused_not_silently_restarted(competition, reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path / "input" / "old" / "run")
    cfg = apply_overrides(engine.Config(), [*TINY_OVERRIDES, "train.lr=0.01"])
    with pytest.raises(JaguarKitError, match=r"train.lr: 0.001 -> 0.01"):
        train(cfg, competition, tmp_path / "working" / "run", progress=False, resume_roots=[tmp_path / "input"])


def test_resume_on_a_changed_train_csv_is_refused_saying_what_changed(competition, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(competition, data)
    out = tmp_path / "run"
    assert train_cli(data, out, fault="train-step:2").returncode == -signal.SIGKILL
    table = pd.read_csv(data / "train.csv")
    extra = table.iloc[:2].copy()
    for i, src in enumerate(extra["filename"]):
        shutil.copy(data / "train" / "train" / src if (data / "train" / "train").is_dir() else data / "train" / src,
                    (data / "train" / "train" if (data / "train" / "train").is_dir() else data / "train") / f"extra{i}.png")
    extra["filename"] = ["extra0.png", "extra1.png"]
    pd.concat([table, extra]).to_csv(data / "train.csv", index=False)
    _one_line_error(train_cli(data, out), "train.csv changed", "2 image(s) added", "accept_data_change")
    accepted = train_cli(data, out, "train.accept_data_change=true")
    assert accepted.returncode == 0, accepted.stderr
    assert "continuing on a changed train.csv" in accepted.stdout


# --- one writer -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(competition, tmp_path):
    out = tmp_path / "run"
    long_run = [*TINY_OVERRIDES, "train.epochs=1000", "train.patience=0"]
    cmd = cli_command("train", "--data", competition, "--out", out, overrides=long_run)
    first = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_cli("train", "--data", competition, "--out", out, overrides=long_run)
        _one_line_error(second, f"in use by process {first.pid}")
        assert first.poll() is None  # the first one goes on, its files untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert load_checkpoint(out / "last.pt")["status"] == "running"


# --- damaged checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("damage, needle", [
    ("flip", "corrupted checkpoint"), ("truncate", "truncated or damaged"), ("random", "not a PyTorch checkpoint")])
def test_a_damaged_checkpoint_is_named_as_such(reference_run, tmp_path, damage, needle):
    path = tmp_path / "best.pt"
    data = bytearray((reference_run / "best.pt").read_bytes())
    if damage == "flip":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data = bytearray(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    path.write_bytes(bytes(data))
    with pytest.raises(JaguarKitError, match=needle) as err:
        load_checkpoint(path)
    assert "code" not in str(err.value)


def test_embedding_from_a_corrupted_checkpoint_fails_in_one_line(competition, reference_run, tmp_path):
    bad = tmp_path / "best.pt"
    data = bytearray((reference_run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    proc = run_cli("embed", "--data", competition, "--out", tmp_path / "emb", "--checkpoint", bad,
                   overrides=TINY_OVERRIDES)
    _one_line_error(proc, "corrupted checkpoint")


# --- the GPU memory probe, with the out-of-memory injected on the CPU --------------------------


def test_fit_batch_checkpoints_all_blocks_then_lowers_p():
    def oom_above(limit):
        def try_step(p, blocks):
            if p * 4 * (1 if blocks == 24 else 3) > limit:  # only checkpointing every block helps here
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return p * 100
        return try_step

    assert fit_batch(oom_above(1000), 8, 4, 24).changes == []
    plan = fit_batch(oom_above(40), 8, 4, 24)
    assert (plan.p, plan.grad_checkpointing, plan.changes) == (8, True, ["model.grad_checkpointing=true"])
    plan = fit_batch(oom_above(20), 8, 4, 24)
    assert (plan.p, plan.grad_checkpointing) == (5, True)
    assert "train.p=5 (was 8: batch 20 instead of 32)" in plan.describe()
    with pytest.raises(JaguarKitError, match="does not fit"):
        fit_batch(oom_above(4), 8, 4, 24)
    with pytest.raises(ValueError):  # anything but out-of-memory is not swallowed
        fit_batch(lambda p, c: (_ for _ in ()).throw(ValueError("bug")), 8, 4, 24)


def test_fit_batch_checkpoints_only_the_blocks_needed_plus_a_margin():
    """Each checkpointed block saves memory: the plan is the fewest blocks that fit, plus 10% of
    the blocks (at least one), and never all 24 when fewer fit (that cost Swin-L 26% of its speed)."""
    tried = []

    def try_step(p, blocks):  # 24 blocks of 1 GiB activations on top of 6 GiB; 16 GiB fit
        tried.append(blocks)
        peak = (6 + (24 - blocks) * 1.0) * 2**30
        if peak > 16 * 2**30:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return int(peak)

    plan = fit_batch(try_step, 8, 4, 24)
    assert plan.blocks == 14 + 3 and plan.p == 8 and not plan.grad_checkpointing  # 14 fit; margin ceil(2.4)
    assert plan.changes == ["model.checkpoint_blocks=17 (of 24 blocks)"]
    assert plan.peak_bytes == 13 * 2**30  # measured at the chosen setting
    assert len(tried) <= 2 + 5 + 1  # configured, all, bisection, the chosen one
    # a configured partial plan that fits is kept as it is
    assert fit_batch(try_step, 8, 4, 24, blocks=20).changes == []


def test_probe_step_leaves_weights_buffers_optimiser_and_rng_untouched(tiny_config):
    from jaguar_kit.losses import ReIDCriterion
    from jaguar_kit.models import build_model
    from jaguar_kit.optim import build_optimizer

    model = build_model(tiny_config.model)
    criterion = ReIDCriterion(tiny_config.loss, tiny_config.model.embedding_dim, 5)
    module = TrainModule(model, criterion).train()
    optimizer = build_optimizer(model, criterion, tiny_config.train)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    probe_step(module, optimizer, 5, 6, 2, (64, 64), torch.device("cpu"), None)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(optimizer.state) == 0 and all(p.grad is None for p in module.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_engine_applies_and_keeps_the_memory_plan(competition, tiny_config, tmp_path, monkeypatch, capsys):
    def fake_probe(module, optimizer, n_classes, batch, k, size, device, amp):
        if batch > 4:  # P=3 x K=2 does not fit, P=2 does
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1 << 30

    monkeypatch.setattr(memory, "_memory_probe_wanted", lambda info: True)
    monkeypatch.setattr(memory, "probe_step", fake_probe)
    cfg = copy.deepcopy(tiny_config)
    cfg.train.time_budget_h = 1e-9  # one step, then a clean stop
    cfg.train.checkpoint_every = 1
    out = tmp_path / "run"
    assert train(cfg, competition, out, progress=False, resume_roots=[]).status == "interrupted"
    printed = capsys.readouterr().out
    assert "memory probe: to fit the GPU's memory: model.grad_checkpointing=true; train.p=2" in printed
    saved = load_checkpoint(out / "last.pt")
    assert saved["memory_plan"] == {"model.grad_checkpointing": True, "train.p": 2}
    assert '"p": 2' in (out / "config.json").read_text()
    # the next session asks for the same P=3; the stored plan applies, no refusal, no new probe
    monkeypatch.setattr(memory, "probe_step", lambda *a: pytest.fail("probed again on resume"))
    cfg.train.time_budget_h = 11.5
    result = train(cfg, competition, out, progress=False, resume_roots=[])
    assert result.status == "finished"


def test_a_read_only_output_folder_is_one_line(competition, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    # a real read-only filesystem: root (as in CI) ignores a folder's permission bits
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = train_cli(competition, ro / "run")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    _one_line_error(proc, str(ro / "run"), "Read-only file system")


def test_inference_falls_back_to_the_frozen_backbone_when_fine_tuning_lost(reference_run, tmp_path):
    from jaguar_kit.train.checkpoint import model_source

    state = load_checkpoint(reference_run / "best.pt")
    for frozen_map, expected in ((1.0, "frozen:tiny-cnn"), (0.0, str(tmp_path / "best.pt"))):
        state["history"] = [{"epoch": 0, "val_map": frozen_map, "val_rank1": 0.0}, *state["history"][1:]]
        torch.save(state, tmp_path / "best.pt")
        assert model_source(tmp_path / "best.pt") == expected
