"""Fault injection and bad input: the kit keeps its promises, and nothing done is lost."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import uuid

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, run_cli
from jaguar_kit import cli
from jaguar_kit.config import apply_overrides
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.models import build_model
from jaguar_kit.train.checkpoint import load_checkpoint
from jaguar_kit.train.engine import train

RELIABILITY = [*TINY_OVERRIDES, "train.epochs=4", "train.checkpoint_every=1"]  # 16 optimiser steps


def _train(data, out, fault=None):
    return run_cli("train", "--data", data, "--out", out, overrides=RELIABILITY, fault=fault)


@pytest.mark.slow
def test_five_random_kills_then_resume_equal_an_uninterrupted_run(competition, tmp_path):
    reference = tmp_path / "reference"
    assert _train(competition, reference).returncode == 0
    rng = random.Random(2026)
    # each kill lands after at least one checkpoint of that session (step >= 2, write >= 2)
    faults = [f"train-step:{rng.randint(2, 4)}" for _ in range(4)] + [f"checkpoint-write:{rng.randint(2, 3)}"]
    rng.shuffle(faults)
    out = tmp_path / "killed"
    steps_seen = []
    for fault in faults:
        proc = _train(competition, out, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-1000:])
        state = load_checkpoint(out / "last.pt")  # the checkpoint on disk always loads
        steps_seen.append(state["global_step"])
    assert steps_seen == sorted(set(steps_seen)) and steps_seen[-1] < 16  # progress kept, never lost
    assert _train(competition, out).returncode == 0
    ref, got = load_checkpoint(reference / "last.pt"), load_checkpoint(out / "last.pt")
    for part in ("model", "criterion"):
        for k, v in ref[part].items():
            assert torch.equal(v, got[part][k]), f"{part}.{k}"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_embedding_killed_at_random_chunks_recomputes_only_unfinished(competition, tmp_path):
    run = tmp_path / "run"
    train_run = run_cli("train", "--data", competition, "--out", run, overrides=[*TINY_OVERRIDES, "train.epochs=1"])
    assert train_run.returncode == 0

    def embed(out, fault=None):
        return run_cli("embed", "--data", competition, "--out", out, "--checkpoint", run / "best.pt", "--split",
                       "train", overrides=["embed.chunk_size=4", "embed.tta=flip4"], fault=fault)

    assert embed(tmp_path / "reference").returncode == 0
    out = tmp_path / "killed"
    rng = random.Random(11)
    for _ in range(3):
        before = {p: p.stat().st_mtime_ns for p in out.rglob("train-flip4_*.npz")}
        assert embed(out, f"chunk-write:{rng.randint(1, 3)}").returncode == -signal.SIGKILL
        after = {p: p.stat().st_mtime_ns for p in out.rglob("train-flip4_*.npz")}
        assert {p: after[p] for p in before} == before  # finished chunks never rewritten
        assert len(after) > len(before)  # each session adds work
    assert embed(out).returncode == 0
    ref = np.load(tmp_path / "reference" / "embeddings_train.npz")
    got = np.load(out / "embeddings_train.npz")
    assert list(ref["names"]) == list(got["names"])
    np.testing.assert_array_equal(ref["vectors"], got["vectors"])


@contextlib.contextmanager
def _tmpfs(path, size_bytes):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test still runs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_disk_full_on_a_real_small_filesystem_keeps_the_previous_checkpoint(competition, tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.checkpoint_every = 1
    probe = train(cfg, competition, tmp_path / "probe" / "run", progress=False, resume_roots=[])
    size = (probe.run_dir / "last.pt").stat().st_size
    with _tmpfs(tmp_path / "small", int(size * 1.6) // 4096 * 4096) as small:
        with pytest.raises(JaguarKitError, match=r"last.pt: disk full .*previous version of this file is kept"):
            train(cfg, competition, small / "run", prepared_root=tmp_path / "probe" / "prepared", progress=False,
                  resume_roots=[])
        state = load_checkpoint(small / "run" / "last.pt")
        assert state["global_step"] == 1
        assert not [p for p in (small / "run").iterdir() if ".tmp-" in p.name]


def test_failing_write_keeps_the_previous_checkpoint(competition, tiny_config, tmp_path, monkeypatch):
    """ENOSPC simulated mid-write (where no tmpfs can be mounted, this still runs)."""
    import errno

    from jaguar_kit.train import checkpoint as ckpt

    real_save, calls = ckpt.torch.save, {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = copy.deepcopy(tiny_config)
    cfg.train.checkpoint_every = 1
    with pytest.raises(JaguarKitError, match="disk full"):
        train(cfg, competition, tmp_path / "run", progress=False, resume_roots=[])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 2


# --- bad input through the command line: exit status 2, one line, nothing partial -------

def _write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _mini_competition(root, n_per_id=3):
    rng = np.random.default_rng(0)
    rows = []
    for ident in ("Ana", "Bo"):
        for j in range(n_per_id):
            name = f"{ident}_{j}.png"
            rgba = rng.integers(0, 255, (40, 60, 4), dtype=np.uint8)
            rgba[..., 3] = 0
            rgba[10:30, 10:50, 3] = 255
            _write_png(root / "train" / "train" / name, rgba)
            rows.append(f"{name},{ident}")
    (root / "train.csv").write_text("filename,ground_truth\n" + "\n".join(rows) + "\n")
    return root


def _break(root, kind):
    first = root / "train" / "train" / "Ana_0.png"
    csv = root / "train.csv"
    if kind == "missing column":
        csv.write_text(csv.read_text().replace("ground_truth", "identity"))
    elif kind == "wrong delimiter":
        csv.write_text(csv.read_text().replace(",", ";"))
    elif kind == "duplicate rows":
        csv.write_text(csv.read_text() + "Ana_0.png,Ana\n")
    elif kind == "missing image":
        first.unlink()
    elif kind == "zero-byte png":
        first.write_bytes(b"")
    elif kind == "truncated png":
        first.write_bytes(first.read_bytes()[:200])
    elif kind == "jpeg named png":
        ok, buf = cv2.imencode(".jpg", np.zeros((40, 60, 3), np.uint8))
        first.write_bytes(buf.tobytes())
    elif kind == "unknown image in a pair":
        _write_png(root / "test" / "test" / "t1.png", np.zeros((40, 60, 3), np.uint8))
        _write_png(root / "test" / "test" / "t2.png", np.zeros((40, 60, 3), np.uint8))
        (root / "test.csv").write_text("row_id,query_image,gallery_image\n0,t1.png,t2.png\n1,t1.png,t9.png\n")


BAD_INPUTS = {
    "missing column": r"train.csv.*column",
    "wrong delimiter": r"train.csv.*delimiter",
    "duplicate rows": r"train.csv.*Ana_0.png.*twice.*lines 2 and 8",
    "missing image": r"Ana_0.png",
    "zero-byte png": r"Ana_0.png.*(empty|zero|0 bytes)",
    "truncated png": r"Ana_0.png.*truncated",
    "jpeg named png": r"Ana_0.png.*JPEG",
    "unknown image in a pair": r"test.csv.*t9.png",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(kind, tmp_path, capsys):
    data = _mini_competition(tmp_path / "data")
    _break(data, kind)
    out = tmp_path / "prepared"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--data", str(data), "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(BAD_INPUTS[kind], err, flags=re.I), err
    assert not out.exists() or not any(out.rglob("*.jpg"))  # validated before any work


def test_sixteen_bit_grayscale_and_transparent_mask_are_accepted(tmp_path, capsys):
    data = _mini_competition(tmp_path / "data")
    img = tmp_path / "data" / "train" / "train"
    _write_png(img / "Ana_0.png", (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 17))  # 16-bit gray
    _write_png(img / "Ana_1.png", np.full((40, 60), 128, np.uint8))  # 8-bit grayscale
    transparent = np.full((40, 60, 4), 200, np.uint8)
    transparent[..., 3] = 0
    _write_png(img / "Bo_0.png", transparent)  # alpha mask with no animal in it
    cli.main(["prepare", "--data", str(data), "--out", str(tmp_path / "prep"), "--quiet",
              "--set", "data.prepared_size=60"])
    out = capsys.readouterr().out
    assert "6 prepared images" in out
    # decision: `crop` with an empty mask keeps the whole frame (nothing is cut away) and says so
    assert "1 with an empty mask (kept whole)" in out


def test_config_errors_name_the_key(tmp_path, capsys):
    for override, message in (("train.epoch=3", "unknown key train.epoch"), ("train.epochs=3.5", "train.epochs must be int")):
        with pytest.raises(SystemExit):
            cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", override])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture_is_refused(competition, tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.epochs = 1
    train(cfg, competition, tmp_path / "cnn", progress=False, resume_roots=[])
    vit = apply_overrides(copy.deepcopy(tiny_config), ["model.backbone=tiny-vit",
                                                       f"model.init_from={tmp_path / 'cnn' / 'best.pt'}"])
    with pytest.raises(JaguarKitError, match=r"best.pt: only \d+/\d+ backbone tensors.*another architecture"):
        build_model(vit.model)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    evil = tmp_path / "last.pt"
    with open(evil, "wb") as f:  # a bare pickle: not even a checkpoint archive
        pickle.dump({"model": {}, "x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(JaguarKitError, match="not a PyTorch checkpoint"):
        load_checkpoint(evil)
    torch.save({"model": {}, "x": _Payload(marker)}, evil)  # a whole archive whose pickle would run code
    with pytest.raises(JaguarKitError, match="refused: it holds Python objects other than tensors"):
        load_checkpoint(evil)
    shutil.copy(evil, tmp_path / "best.pt")
    with pytest.raises(SystemExit):
        cli.main(["embed", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "best.pt")])
    assert not marker.exists()
