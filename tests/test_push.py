"""Kernel build and push: notebooks carry a kernelspec, pushed folders are valid, and the
`kaggle` CLI's silent failures (dropped sources) are turned into errors.

A fake `kaggle` executable on PATH stands in for the real CLI: no network.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import jupytext
import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.kaggle import metadata as md
from jaguar_kit.kaggle import push

HEADER = """\
# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
"""

BODY = """
# %% [markdown]
# # Jaguar {kind}
# Stand-in kernel.

# %%
import subprocess, sys
x = 1

# %%
def f(y):
    return y + x

print(f(2))
"""


def stand_in(folder: Path, kind: str, header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.py"
    path.write_text(header + BODY.format(kind=kind))
    return path


@pytest.fixture
def kernels(tmp_path) -> Path:
    for kind in md.KINDS:
        stand_in(tmp_path / "kernels", kind)
    return tmp_path / "kernels"


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """Put a `kaggle` on PATH that logs its arguments and prints $FAKE_KAGGLE_PRINT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "kaggle-calls.jsonl"
    script = bin_dir / "kaggle"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(os.environ.get('FAKE_KAGGLE_PRINT', 'Kernel version 1 successfully pushed.'))\n"
        "sys.exit(int(os.environ.get('FAKE_KAGGLE_EXIT', '0')))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def test_jupytext_round_trip_keeps_cells(kernels, tmp_path):
    src = kernels / "train.py"
    nb_path = push.build_notebook(src, tmp_path / "build")
    nb = json.loads(nb_path.read_text())
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code", "code"]
    sources = ["".join(c["source"]) for c in nb["cells"]]
    assert sources[0] == "# Jaguar train\nStand-in kernel."
    assert sources[1] == "import subprocess, sys\nx = 1"
    assert sources[2] == "def f(y):\n    return y + x\n\nprint(f(2))"
    # and back: the notebook converts to the same percent script cells
    back = jupytext.reads(jupytext.writes(jupytext.read(nb_path), fmt="py:percent"), fmt="py:percent")
    assert [(c.cell_type, c.source) for c in back.cells] == [(c["cell_type"], s) for c, s in zip(nb["cells"], sources)]


def test_built_notebook_has_a_kernelspec_and_validates(kernels, tmp_path):
    nb_path = push.build_notebook(kernels / "infer.py", tmp_path / "build")
    assert nb_path == tmp_path / "build" / "infer.ipynb"
    assert json.loads(nb_path.read_text())["metadata"]["kernelspec"]["name"] == "python3"
    meta = md.kernel_metadata("infer", "alice")
    assert md.validate_kernel_metadata(meta, nb_path.parent, expect_gpu=True) == []


def test_build_refuses_a_source_without_kernelspec(tmp_path):
    src = stand_in(tmp_path, "train", header="")
    with pytest.raises(JaguarKitError, match="no kernelspec.*No kernel name found") as e:
        push.build_notebook(src, tmp_path / "build")
    assert str(src) in str(e.value)
    assert not (tmp_path / "build" / "train.ipynb").exists()


@pytest.mark.parametrize("kind", md.KINDS)
def test_dry_run_builds_a_valid_folder_and_returns_the_command(kernels, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # dry run needs no kaggle CLI
    build = tmp_path / "build"
    cmd = push.push_kernel(kind, "alice", build, dry_run=True, kernels_dir=kernels)
    folder = build / kind
    assert cmd == ["kaggle", "kernels", "push", "-p", str(folder)]
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == f"alice/{md.kernel_slug(kind)}" and meta["code_file"] == f"{kind}.ipynb"
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=kind != "submit") == []
    assert all(s.startswith("alice/") for s in meta["dataset_sources"] + meta["kernel_sources"])


def test_user_defaults_to_kaggle_username_and_placeholder_is_refused(kernels, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with pytest.raises(JaguarKitError, match="replace the placeholder.*KAGGLE_USERNAME"):
        push.push_kernel("train", None, tmp_path / "b1", dry_run=True, kernels_dir=kernels)
    assert not (tmp_path / "b1" / "train" / "kernel-metadata.json").exists()
    monkeypatch.setenv("KAGGLE_USERNAME", "carol")
    push.push_kernel("train", None, tmp_path / "b2", dry_run=True, kernels_dir=kernels)
    assert json.loads((tmp_path / "b2" / "train" / "kernel-metadata.json").read_text())["id"].startswith("carol/")


def test_push_from_a_folder_with_the_repo_root_metadata(tmp_path):
    """The repository root's kernel-metadata.json (a script) pushes from a build copy."""
    root = tmp_path / "repo"
    md.write_repo_metadata(root)
    stand_in(root / "kernels", "train")
    cmd = push.push_kernel(root, "alice", tmp_path / "build", dry_run=True)
    folder = Path(cmd[-1])
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "train.py" and (folder / "train.py").read_text() == (root / "kernels/train.py").read_text()
    assert meta["id"] == "alice/jaguar-re-id-train"
    assert meta["dataset_sources"] == ["alice/jaguar-kit-wheel"]
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=True) == []


def test_folder_with_notebook_metadata_and_py_source_is_converted(tmp_path):
    src = tmp_path / "k"
    stand_in(src, "infer")
    meta = md.kernel_metadata("infer", "alice", code_file="infer.py")
    (src / "kernel-metadata.json").write_text(json.dumps(meta))
    folder = Path(push.push_kernel(src, None, tmp_path / "build", dry_run=True)[-1])
    assert json.loads((folder / "kernel-metadata.json").read_text())["code_file"] == "infer.ipynb"
    assert "kernelspec" in json.loads((folder / "infer.ipynb").read_text())["metadata"]


def test_invalid_metadata_is_refused_before_kaggle_runs(tmp_path, fake_kaggle):
    src = tmp_path / "k"
    stand_in(src, "train")
    meta = md.kernel_metadata("train", "alice", kernel_type="script", code_file="train.py")
    del meta["enable_internet"]
    meta["dataset_sources"] = ["jaguar-kit-wheel"]
    (src / "kernel-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(JaguarKitError) as e:
        push.push_kernel(src, None, tmp_path / "build")
    assert "enable_internet: missing" in str(e.value) and "dataset_sources 'jaguar-kit-wheel'" in str(e.value)
    assert fake_kaggle() == []


def test_push_runs_the_kaggle_cli_on_the_build_folder(kernels, tmp_path, fake_kaggle):
    cmd = push.push_kernel("infer", "alice", tmp_path / "build", kernels_dir=kernels)
    assert fake_kaggle() == [["kernels", "push", "-p", str(tmp_path / "build" / "infer")]]
    assert cmd[1:] == fake_kaggle()[0]


def test_push_raises_when_kaggle_drops_sources(kernels, tmp_path, fake_kaggle, monkeypatch):
    monkeypatch.setenv(
        "FAKE_KAGGLE_PRINT",
        "The following are not valid dataset sources and could not be added to the kernel: "
        "['alice/jaguar-kit-wheel']\nKernel version 3 successfully pushed.",
    )
    with pytest.raises(JaguarKitError, match=r"dropped sources.*not valid dataset sources.*alice/jaguar-kit-wheel"):
        push.push_kernel("submit", "alice", tmp_path / "build", kernels_dir=kernels)
    assert len(fake_kaggle()) == 1  # it ran; the exit status was 0, the output gave it away


def test_push_raises_on_cli_failure(kernels, tmp_path, fake_kaggle, monkeypatch):
    monkeypatch.setenv("FAKE_KAGGLE_PRINT", "403 Client Error: Forbidden")
    monkeypatch.setenv("FAKE_KAGGLE_EXIT", "1")
    with pytest.raises(JaguarKitError, match=r"failed \(exit 1\): 403 Client Error"):
        push.push_kernel("train", "alice", tmp_path / "build", kernels_dir=kernels)
    monkeypatch.setenv("FAKE_KAGGLE_PRINT", "Kernel push error: Notebook not found")
    monkeypatch.setenv("FAKE_KAGGLE_EXIT", "0")
    with pytest.raises(JaguarKitError, match="push failed: Kernel push error"):
        push.push_kernel("train", "alice", tmp_path / "build", kernels_dir=kernels)


def test_missing_kaggle_cli_says_how_to_install(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(JaguarKitError, match="kaggle: command not found; `pip install kaggle`"):
        push.push_kernel("train", "alice", tmp_path / "build", kernels_dir=kernels)


def test_unknown_kernel_and_missing_source_are_clear(tmp_path):
    with pytest.raises(JaguarKitError, match="neither one of train, infer, submit"):
        push.push_kernel("trian", "alice", tmp_path / "build", dry_run=True)
    with pytest.raises(JaguarKitError, match="train.py: kernel source not found"):
        push.push_kernel("train", "alice", tmp_path / "build", dry_run=True, kernels_dir=tmp_path / "none")


def test_command_line(kernels, tmp_path, capsys):
    args = ["submit", "--user", "alice", "--dry-run", "--kernels-dir", str(kernels), "--build-dir", str(tmp_path / "b")]
    assert push.main(args) == 0
    assert f"kaggle kernels push -p {tmp_path / 'b' / 'submit'}" in capsys.readouterr().out
    assert push.main(["train", "--resume", *args[1:]]) == 0
    meta = json.loads((tmp_path / "b" / "train" / "kernel-metadata.json").read_text())
    assert meta["kernel_sources"] == ["alice/jaguar-re-id-train"]
    assert push.main(["train", "--dry-run", "--kernels-dir", str(tmp_path / "none")]) == 2
    assert "error: " in capsys.readouterr().err
