"""Shared fixtures: a small synthetic competition and a tiny CPU training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaguar_kit.config import Config, apply_overrides

REPO = Path(__file__).resolve().parents[1]

# Training on a tiny model: a few seconds on a CPU, deterministic.
TINY_OVERRIDES = [
    "model.backbone=tiny-cnn",
    "model.weights=none",
    "model.embedding_dim=32",
    "data.prepared_size=96",
    "data.num_folds=3",
    "data.workers=0",
    "train.device=cpu",
    "train.epochs=2",
    "train.p=3",
    "train.k=2",
    "train.steps_per_epoch=4",
    "train.lr=1e-3",
    "train.warmup_epochs=0.5",
    "train.head_epochs=0.5",  # two steps of head-only training, then the backbone joins
    "embed.batch_size=16",
    "embed.chunk_size=5",
]


@pytest.fixture(scope="session", autouse=True)
def prepared_cache(tmp_path_factory) -> Path:
    """One prepared-image cache for the session (train and embed share it, as on a user's machine),
    kept out of the repository's working folder."""
    path = tmp_path_factory.mktemp("prepared")
    os.environ["JAGUAR_KIT_PREPARED"] = str(path)
    return path


@pytest.fixture(scope="session")
def competition(tmp_path_factory) -> Path:
    from jaguar_kit.data.synth import generate_competition

    return generate_competition(tmp_path_factory.mktemp("comp") / "data", identities=6, images_per_identity=6,
                                test_per_identity=2, size=96, seed=3, progress=False)


@pytest.fixture
def tiny_config() -> Config:
    return apply_overrides(Config(), list(TINY_OVERRIDES))


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m jaguar_kit.cli`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAGUAR_KIT_FAULT", None)
    env["JAGUAR_KIT_INPUT"] = env.get("JAGUAR_KIT_INPUT", "/nonexistent-input")
    env.update(extra)
    return env


PYTHON = sys.executable


def cli_command(*args, overrides=()) -> list[str]:
    """``python -m jaguar_kit.cli ARGS --quiet --set O ...``"""
    cmd = [PYTHON, "-m", "jaguar_kit.cli", *map(str, args), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_cli(*args, overrides=(), fault: str | None = None, timeout: float = 300, **env: str):
    """Run the command line in a subprocess; ``fault`` arms a JAGUAR_KIT_FAULT kill point."""
    if fault:
        env["JAGUAR_KIT_FAULT"] = fault
    return subprocess.run(cli_command(*args, overrides=overrides), env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def train_cli(data, out, *overrides, fault: str | None = None):
    """``jaguar-kit train`` on the tiny config, with ``last.pt`` written after every step."""
    return run_cli("train", "--data", data, "--out", out,
                   overrides=[*TINY_OVERRIDES, "train.checkpoint_every=1", *overrides], fault=fault)


def checkpoint_weights(path) -> dict:
    """Every trained tensor of a checkpoint (model and ArcFace head), by name."""
    from jaguar_kit.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"criterion.{k}": v for k, v in state["criterion"].items()}}


@pytest.fixture(scope="session")
def reference_run(competition, tmp_path_factory) -> Path:
    """An uninterrupted tiny training run, the yardstick for every resumed or damaged one."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = train_cli(competition, out)
    assert proc.returncode == 0, proc.stderr
    return out


def fake_wheel(folder: Path, version: str = "0.1.0", mtime: float | None = None) -> Path:
    """A file named like our wheel (for the searches that find it; never installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"jaguar_kit-{version}-py3-none-any.whl"
    path.write_bytes(b"PK")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path
