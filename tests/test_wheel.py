"""The wheel the kernels install offline: pure, only our package, complete, and importable
in a bare interpreter after `pip install --no-index --no-deps` (as on Kaggle)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import jaguar_kit
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.kaggle.metadata import PLACEHOLDER_USER, validate_dataset_metadata

REPO = Path(__file__).resolve().parents[1]


def _load_build_dataset():
    spec = importlib.util.spec_from_file_location("build_dataset", REPO / "build_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bd = _load_build_dataset()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel") / "kaggle-dataset"
    out.mkdir()
    (out / "jaguar_kit-0.0.1-py3-none-any.whl").write_bytes(b"old")  # a previous build
    bd.build_dataset(out, "alice")
    return out


@pytest.fixture(scope="module")
def wheel(dataset) -> Path:
    wheels = list(dataset.glob("*.whl"))
    assert len(wheels) == 1, wheels  # the stale wheel was replaced, not kept beside it
    return wheels[0]


def test_dataset_folder_has_the_wheel_at_top_level_and_valid_metadata(dataset, wheel):
    assert wheel.parent == dataset
    assert sorted(p.name for p in dataset.iterdir()) == sorted([wheel.name, "dataset-metadata.json"])
    meta = json.loads((dataset / "dataset-metadata.json").read_text())
    assert validate_dataset_metadata(meta) == []
    assert meta["id"] == "alice/jaguar-kit-wheel"


def test_wheel_is_pure_and_holds_only_the_package(wheel):
    assert wheel.name == f"jaguar_kit-{jaguar_kit.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"jaguar_kit-{jaguar_kit.__version__}.dist-info/"
    assert all(n.startswith(("jaguar_kit/", dist_info)) for n in names), names
    assert not any("tests/" in n or n.endswith((".pyc", ".ipynb")) for n in names)
    wheel_meta = zipfile.ZipFile(wheel).read(dist_info + "WHEEL").decode()
    assert "Root-Is-Purelib: true" in wheel_meta and "Tag: py3-none-any" in wheel_meta


def test_wheel_holds_every_module_of_the_package(wheel):
    """A sub-package without __init__.py would be left out and fail only on Kaggle."""
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "jaguar_kit").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources - names == set()


def test_the_kernels_install_cell_installs_it_offline_into_a_bare_venv(wheel, dataset, tmp_path):
    """The install cell, as it runs on Kaggle, in a Python that has never seen jaguar_kit."""
    from test_kernels import install_cell

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    input_root = tmp_path / "input"
    (input_root / "datasets" / "alice").mkdir(parents=True)
    (input_root / "datasets" / "alice" / "jaguar-kit-wheel").symlink_to(dataset, target_is_directory=True)
    env = {"PATH": os.environ.get("PATH", ""), "JAGUAR_KIT_INPUT": str(input_root), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # -I: no repo, no PYTHONPATH; --no-deps keeps pip from wanting torch, so the import of
    # jaguar_kit's top level (standard library only) must come from the venv.
    proc = subprocess.run([str(python), "-I", "-c", install_cell("train")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"jaguar_kit {jaguar_kit.__version__} from {venv}" in proc.stdout
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    assert {p["name"] for p in json.loads(listed.stdout)} == {"pip", "jaguar_kit"} | (
        {"setuptools"} if "setuptools" in listed.stdout else set())  # nothing but the wheel was installed


def test_placeholder_owner_is_refused_before_building(tmp_path):
    with pytest.raises(JaguarKitError, match="replace the placeholder"):
        bd.build_dataset(tmp_path / "out", PLACEHOLDER_USER)
    assert not (tmp_path / "out").exists()


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, "")
    return path


def test_check_wheel_refuses_impure_or_stray_wheels(tmp_path):
    good = ["jaguar_kit/__init__.py", "jaguar_kit-0.1.0.dist-info/WHEEL"]
    bd.check_wheel(_zip(tmp_path / "jaguar_kit-0.1.0-py3-none-any.whl", good))
    with pytest.raises(JaguarKitError, match="not a pure py3-none-any wheel"):
        bd.check_wheel(_zip(tmp_path / "jaguar_kit-0.1.0-cp311-cp311-linux_x86_64.whl", good))
    (tmp_path / "x").mkdir()
    with pytest.raises(JaguarKitError, match="outside jaguar_kit/: tests/test_x.py"):
        bd.check_wheel(_zip(tmp_path / "x" / "jaguar_kit-0.1.0-py3-none-any.whl", good + ["tests/test_x.py"]))


def test_command_line_prints_the_upload_commands(tmp_path, capsys):
    out = tmp_path / "ds"
    assert bd.main(["--out", str(out), "--owner", "alice"]) == 0
    printed = capsys.readouterr().out
    assert f"kaggle datasets create -p {out}" in printed
    assert f"kaggle datasets version -p {out} -m 'jaguar_kit {jaguar_kit.__version__}'" in printed
    assert bd.main(["--out", str(tmp_path / "ds2"), "--owner", PLACEHOLDER_USER]) == 2
    assert "KAGGLE_USERNAME" in capsys.readouterr().err
