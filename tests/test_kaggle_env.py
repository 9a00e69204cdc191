"""Environment discovery: the same kernel finds its folders and our wheel on Kaggle and off it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.kaggle import env


@pytest.fixture
def off_kaggle(monkeypatch, tmp_path):
    """A session that is not Kaggle, whatever the machine running the tests."""
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "JAGUAR_KIT_INPUT", "JAGUAR_KIT_WORKING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", tmp_path / "no-kaggle-working")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _wheel(folder: Path, version: str = "0.1.0", mtime: float | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"jaguar_kit-{version}-py3-none-any.whl"
    path.write_bytes(b"PK")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_off_kaggle_paths_default_to_local_work(off_kaggle):
    assert not env.is_kaggle()
    assert env.working_root() == off_kaggle / "work"
    assert env.default_cache_dir() == off_kaggle / "work" / "cache"
    assert env.input_root() == Path("/kaggle/input")


def test_kaggle_defaults_are_kaggles_folders():
    assert env.KAGGLE_WORKING == Path("/kaggle/working")
    assert env.KAGGLE_INPUT == Path("/kaggle/input")


def test_kaggle_session_detected_from_run_type(off_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert env.is_kaggle()
    assert env.working_root() == env.KAGGLE_WORKING  # /kaggle/working (patched by the fixture)
    assert env.default_cache_dir() == env.KAGGLE_WORKING / "cache"


def test_kaggle_session_detected_from_working_folder(off_kaggle, monkeypatch, tmp_path):
    working = tmp_path / "kaggle-working"
    working.mkdir()
    monkeypatch.setattr(env, "KAGGLE_WORKING", working)
    assert env.is_kaggle()
    assert env.working_root() == working


def test_env_vars_override_every_root(off_kaggle, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # overrides win on Kaggle too
    monkeypatch.setenv("JAGUAR_KIT_INPUT", str(tmp_path / "in"))
    monkeypatch.setenv("JAGUAR_KIT_WORKING", str(tmp_path / "out"))
    assert env.input_root() == tmp_path / "in"
    assert env.working_root() == tmp_path / "out"
    assert env.default_cache_dir() == tmp_path / "out" / "cache"


@pytest.mark.parametrize(
    "layout",
    [
        "datasets/alice/jaguar-kit-wheel",  # current Kaggle layout
        "jaguar-kit-wheel",  # legacy layout
        "datasets/alice/jaguar-kit-wheel/dist",  # dataset uploaded with a sub-folder
        ".",  # the wheel right in the root (a local folder)
    ],
)
def test_find_wheel_in_each_layout(tmp_path, layout):
    root = tmp_path / "input"
    (root / "competitions" / "jaguar-re-id" / "train").mkdir(parents=True)
    _wheel(root / "datasets" / "bob" / "other").rename(root / "datasets" / "bob" / "other" / "timm-1.0-py3-none-any.whl")
    wheel = _wheel(root / layout)
    assert env.find_wheel(root) == wheel


def test_find_wheel_uses_input_root_by_default(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "datasets" / "alice" / "jaguar-kit-wheel")
    monkeypatch.setenv("JAGUAR_KIT_INPUT", str(tmp_path))
    assert env.find_wheel() == wheel


def test_find_wheel_picks_highest_version_then_newest_file(tmp_path):
    now = time.time()
    _wheel(tmp_path / "a", "0.9.0", now)
    ten = _wheel(tmp_path / "b", "0.10.0", now - 1000)  # higher version, older file
    assert env.find_wheel(tmp_path) == ten  # 0.10 > 0.9, not string order
    newer = _wheel(tmp_path / "c", "0.10.0", now)
    assert env.find_wheel(tmp_path) == newer


def test_find_wheel_follows_linked_legacy_layout_once(tmp_path):
    wheel = _wheel(tmp_path / "datasets" / "alice" / "jaguar-kit-wheel")
    (tmp_path / "jaguar-kit-wheel").symlink_to(wheel.parent, target_is_directory=True)
    found = env.find_wheel(tmp_path)
    assert found.resolve() == wheel.resolve()
    # a link loop does not hang the bounded walk
    (wheel.parent / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert env.find_wheel(tmp_path).resolve() == wheel.resolve()


def test_find_wheel_depth_is_bounded(tmp_path):
    _wheel(tmp_path / "a" / "b" / "c" / "d" / "e" / "f")  # 6 levels down
    with pytest.raises(JaguarKitError, match=r"no jaguar_kit-\*\.whl within 5 folder levels"):
        env.find_wheel(tmp_path)
    assert env.find_wheel(tmp_path, max_depth=6).parent.name == "f"


def test_find_wheel_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(JaguarKitError, match="input folder not found.*JAGUAR_KIT_INPUT") as e:
        env.find_wheel(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaguarKitError, match="attach the jaguar-kit-wheel dataset") as e:
        env.find_wheel(tmp_path / "empty")
    assert "\n" not in str(e.value)


def test_install_command_is_offline_and_keeps_the_image_packages(tmp_path):
    wheel = tmp_path / "jaguar_kit-0.1.0-py3-none-any.whl"
    cmd = env.install_command(wheel)
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-index" in cmd and "--no-deps" in cmd
    assert cmd[-1] == str(wheel)
    assert env.install_command(wheel, python="/x/python")[0] == "/x/python"
    # the real install into a bare interpreter is exercised in test_wheel.py
