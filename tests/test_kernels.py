"""The three kernels as a Kaggle user reads and parametrises them, and their install cell.

Executing them end to end is tests/test_kaggle_journeys.py; here: what the notebooks look
like (visible markdown titles, a `parameters` cell papermill can set, one identical install
cell), and that the install cell, the copy that runs on Kaggle, finds the wheel by the same
rule as the package's walker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jupytext
import nbformat
import pytest
from conftest import REPO, fake_wheel

from jaguar_kit.kaggle import env
from jaguar_kit.kaggle.metadata import KINDS
from jaguar_kit.kaggle.push import build_notebook

KERNELS = list(KINDS)


def _notebook(kernel: str):
    return jupytext.read(REPO / "kernels" / f"{kernel}.py", fmt="py:percent")


def install_cell(kernel: str) -> str:
    """The source of a kernel's install cell (the code cell after the "Install" title)."""
    cells = _notebook(kernel).cells
    i = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Install"))
    assert cells[i + 1].cell_type == "code"
    return cells[i + 1].source


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_reads_as_a_notebook_with_visible_titles_and_one_parameters_cell(kernel, tmp_path):
    nb = _notebook(kernel)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    again = jupytext.reads(jupytext.writes(nb, fmt="py:percent"), fmt="py:percent")
    assert [c.source for c in again.cells] == [c.source for c in nb.cells]
    # every title is a markdown cell (a `# %% Title` comment becomes hidden cell metadata)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# jaguar_kit: ")
    assert not any("title" in c.metadata for c in nb.cells)
    assert all(nb.cells[i - 1].cell_type == "markdown" for i, c in enumerate(nb.cells) if c.cell_type == "code")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    # what Kaggle receives: the built .ipynb keeps the tag where papermill reads it
    built = json.loads(build_notebook(REPO / "kernels" / f"{kernel}.py", tmp_path).read_text())
    params = [c for c in built["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and "OVERRIDES = []" in "".join(params[0]["source"])
    # papermill can read every setting (an "=" in a comment, or a tuple assignment, hides it)
    from papermill.translators import PythonTranslator

    cell = nbformat.from_dict({**params[0], "source": "".join(params[0]["source"])})
    names = [p.name for p in PythonTranslator.inspect(cell)]
    assigned = [ln.split("=")[0].strip() for ln in tagged[0].source.splitlines() if ln and not ln.startswith("#")]
    assert names == assigned and "OVERRIDES" in names
    assert [c["cell_type"] for c in built["cells"]].count("markdown") >= 4


def test_the_submit_notebooks_pseudo_label_round_is_one_call_into_the_package():
    cells = _notebook("submit").cells
    i = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "pseudo-label round" in c.source
             and c.source.startswith("## "))
    code = cells[i + 1].source
    assert "pseudo_label_ensemble(" in code
    # the orchestration (selection, training, republishing, embedding) lives in jaguar_kit.pseudo, tested there
    for inside in ("def ", "select_pseudo_labels", "pseudo_label_round", "shutil", "embed_split", "find_outputs",
                   "raise "):
        assert inside not in code, inside


def test_the_install_cell_is_the_same_in_every_kernel_and_follows_the_walkers_depth():
    cells = {k: install_cell(k) for k in KERNELS}
    assert cells["train"] == cells["infer"] == cells["submit"]
    assert f"max_depth={env.INPUT_DEPTH}" in cells["train"]
    assert "JAGUAR_KIT_SRC" not in cells["train"] and "JAGUAR_KIT_SET" not in "".join(
        (REPO / "kernels" / f"{k}.py").read_text() for k in KERNELS)


def _run_install_cell(roots: list, tmp_path) -> subprocess.CompletedProcess:
    """Run the install cell in a bare interpreter (-S: no site-packages, so no jaguar_kit) whose
    pip is a stub printing what it was asked to install; the "installed" package is a stub
    that becomes importable once pip ran, as the real install does."""
    import packaging

    stub = tmp_path / "stub"
    (stub / "pip").mkdir(parents=True, exist_ok=True)
    (stub / "pip" / "__init__.py").write_text("")
    (stub / "pip" / "__main__.py").write_text("import sys\nprint('PIP', ' '.join(sys.argv[1:]))\n")
    installed = tmp_path / "site"
    (installed / "jaguar_kit").mkdir(parents=True, exist_ok=True)
    (installed / "jaguar_kit" / "__init__.py").write_text("__version__ = '0.0.dev'\n")
    source = install_cell("train").replace(
        "importlib.invalidate_caches()", f"importlib.invalidate_caches(); sys.path.append({str(installed)!r})")
    env_vars = {"PATH": os.environ.get("PATH", ""), "JAGUAR_KIT_INPUT": os.pathsep.join(map(str, roots)),
                "PYTHONPATH": os.pathsep.join([str(stub), os.path.dirname(os.path.dirname(packaging.__file__))])}
    return subprocess.run([sys.executable, "-S", "-c", source], capture_output=True, text=True, env=env_vars,
                          cwd=tmp_path)


@pytest.mark.parametrize("layout", [
    "datasets/alice/jaguar-kit-wheel",  # current Kaggle layout
    "jaguar-kit-wheel",  # legacy layout
    "datasets/alice/jaguar-kit-wheel/dist/v2/a/b",  # 7 folders down: the walker's limit
    ".",  # the wheel right in the root (a local folder)
])
def test_install_cell_installs_the_wheel_the_walker_finds(layout, tmp_path):
    root = tmp_path / "input"
    (root / "competitions" / "jaguar-re-id" / "train").mkdir(parents=True)
    fake_wheel(root / ".git")  # hidden: skipped by both
    (root / "datasets" / "bob" / "other").mkdir(parents=True)
    (root / "datasets" / "bob" / "other" / "timm-1.0-py3-none-any.whl").write_bytes(b"PK")
    wheel = fake_wheel(root / layout)
    walker = env.find_files(lambda n: n.startswith("jaguar_kit-") and n.endswith(".whl"), [root])
    assert walker == [wheel]
    proc = _run_install_cell([root], tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]
    pip = [ln for ln in proc.stdout.splitlines() if ln.startswith("PIP ")]
    assert pip == [f"PIP install --quiet --no-index --no-deps --force-reinstall {wheel}"]


def test_install_cell_depth_links_and_versions_match_the_walker(tmp_path):
    root, other = tmp_path / "input", tmp_path / "elsewhere"
    fake_wheel(root / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h", "9.0.0")  # 8 down: beyond both
    real = fake_wheel(other / "datasets" / "alice" / "jaguar-kit-wheel", "0.10.0", mtime=1_000_000)
    (root / "jaguar-kit-wheel").mkdir(parents=True)
    (root / "jaguar-kit-wheel" / "loop").symlink_to(root, target_is_directory=True)  # a loop costs nothing
    (root / "old").mkdir()
    fake_wheel(root / "old", "0.9.0")  # a lower version, newer file
    walker = env.find_files(lambda n: n.startswith("jaguar_kit-") and n.endswith(".whl"), [root, other])
    assert sorted(p.name for p in walker) == ["jaguar_kit-0.10.0-py3-none-any.whl", "jaguar_kit-0.9.0-py3-none-any.whl"]
    proc = _run_install_cell([root, f"  {other}  "], tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert f"--force-reinstall {real}" in proc.stdout  # 0.10 > 0.9, not string order or file age


def test_install_cell_without_a_wheel_says_what_to_attach(tmp_path):
    (tmp_path / "input" / "competitions").mkdir(parents=True)
    proc = _run_install_cell([tmp_path / "input"], tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: no jaguar_kit-*.whl under") and "attach the jaguar-kit-wheel" in last
