"""The three Kaggle kernels, run as plain scripts against a local stand-in for /kaggle."""

from __future__ import annotations

import shutil
import signal
import subprocess

import jupytext
import pandas as pd
import pytest

from conftest import PYTHON, REPO, TINY_OVERRIDES, cli_env
from jaguar_kit.submission import validate_submission

KERNELS = ["train", "infer", "submit"]


def _run(kernel: str, input_root, working, fault: str | None = None, extra_set: tuple[str, ...] = ()):
    env = cli_env(JAGUAR_KIT_SRC=str(REPO), JAGUAR_KIT_INPUT=str(input_root), JAGUAR_KIT_WORKING=str(working),
                  JAGUAR_KIT_SET=";".join([*TINY_OVERRIDES, "train.epochs=1", "embed.chunk_size=4", *extra_set]))
    if fault:
        env["JAGUAR_KIT_FAULT"] = fault
    return subprocess.run([PYTHON, str(REPO / "kernels" / f"{kernel}.py")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=working.parent)


@pytest.mark.slow
def test_kernels_end_to_end_with_a_killed_inference(competition, tmp_path):
    input_root = tmp_path / "input"
    shutil.copytree(competition, input_root / "competitions" / "jaguar-re-id")  # Kaggle's new layout
    working = tmp_path / "working"
    working.mkdir()

    train = _run("train", input_root, working)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (working / "run" / "best.pt").is_file() and (working / "run" / "curves.png").is_file()

    killed = _run("infer", input_root, working, fault="chunk-write:3")
    assert killed.returncode == -signal.SIGKILL
    chunks = {p: p.stat().st_mtime_ns for p in (working / "cache").rglob("test-flip4_*.npz")}
    assert len(chunks) == 2
    infer = _run("infer", input_root, working)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in chunks} == chunks  # finished chunks were not recomputed
    assert len(list((working / "cache").rglob("test-flip4_*.npz"))) == 3  # 12 test images / 4 per chunk

    submit = _run("submit", input_root, working)
    assert submit.returncode == 0, submit.stderr[-2000:]
    pairs = pd.read_csv(competition / "test.csv")
    validate_submission(working / "submission.csv", pairs)
    assert (working / "retrieval_grid.png").stat().st_size > 1000
    assert "kaggle competitions submit -c jaguar-re-id" in submit.stdout


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_round_trips_through_jupytext_with_a_kernelspec(kernel):
    text = (REPO / "kernels" / f"{kernel}.py").read_text()
    notebook = jupytext.reads(text, fmt="py:percent")
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    again = jupytext.reads(jupytext.writes(notebook, fmt="py:percent"), fmt="py:percent")
    assert [c.source for c in again.cells] == [c.source for c in notebook.cells]
    assert [c.cell_type for c in notebook.cells][0] == "markdown" and len(notebook.cells) >= 4
