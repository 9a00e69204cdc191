"""Environment discovery: the same kernel finds its folders and our wheel on Kaggle and off it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jaguar_kit.kaggle import env


@pytest.fixture
def off_kaggle(monkeypatch, tmp_path):
    """A session that is not Kaggle, whatever the machine running the tests."""
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "JAGUAR_KIT_INPUT", "JAGUAR_KIT_WORKING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", tmp_path / "no-kaggle-working")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_off_kaggle_paths_default_to_local_work(off_kaggle):
    assert not env.is_kaggle()
    assert env.working_root() == off_kaggle / "work"
    assert env.default_cache_dir() == off_kaggle / "work" / "cache"


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
    assert env.working_root() == tmp_path / "out"
    assert env.default_cache_dir() == tmp_path / "out" / "cache"


def test_input_variable_is_read_one_way(off_kaggle, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("JAGUAR_KIT_INPUT", os.pathsep.join(["~/in", "", str(tmp_path / "b"), " "]))
    assert env.input_roots() == [home / "in", tmp_path / "b"]
    monkeypatch.setenv("JAGUAR_KIT_INPUT", "")
    assert env.input_roots() == [Path("/kaggle/input")]


def test_prepared_images_stay_out_of_the_kaggle_output(off_kaggle, monkeypatch, tmp_path):
    monkeypatch.delenv("JAGUAR_KIT_PREPARED", raising=False)  # (the test session sets one)
    assert env.default_prepared_root() == off_kaggle / "work" / "prepared"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("JAGUAR_KIT_WORKING", str(tmp_path / "working"))
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))  # the session's local disk
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    prepared = env.default_prepared_root()
    assert prepared == tmp_path / "scratch" / "jaguar_kit" / "prepared"
    assert env.working_root() not in prepared.parents
    monkeypatch.setenv("JAGUAR_KIT_PREPARED", "~/prep")
    assert env.default_prepared_root() == Path("~/prep").expanduser()


def test_internet_check_is_offline_safe(monkeypatch):
    import socket

    calls = []

    def unreachable(address, timeout=None):
        calls.append((address, timeout))
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443")
    assert env.internet_on() is False
    assert calls == [(("hf-mirror.example", 443), 1.5)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub library's own switch: not even tried
    assert env.internet_on() is False and len(calls) == 1


def _tree(root: Path, rels: list[str]) -> None:
    for rel in rels:
        (root / rel).mkdir(parents=True, exist_ok=True)


def test_walker_is_bounded_breadth_first_and_skips_hidden(tmp_path):
    _tree(tmp_path, ["a/b/c/d/e/f/g/h", "z", ".git/objects", "a/.cache/x"])
    (tmp_path / "a" / "f.txt").write_text("x")
    (tmp_path / ".hidden.txt").write_text("x")
    seen = [(f.path.relative_to(tmp_path).as_posix(), f.depth) for f in env.walk_inputs([tmp_path])]
    assert seen[:3] == [(".", 0), ("a", 1), ("z", 1)]  # shallowest first, sorted
    assert ("a/b/c/d/e/f/g", 7) in seen and not any(p.endswith("/h") for p, _ in seen)  # depth 7 listed, 8 not
    assert not any(".git" in p or ".cache" in p for p, _ in seen)
    root = next(env.walk_inputs([tmp_path]))
    assert root.files == [] and "a" in root.dirs  # hidden files are skipped too
    assert [f.depth for f in env.walk_inputs([tmp_path], max_depth=1)] == [0, 1, 1]


def test_walker_follows_links_once_and_survives_loops(tmp_path):
    real = tmp_path / "datasets" / "alice" / "jaguar-kit-wheel"
    real.mkdir(parents=True)
    (real / "jaguar_kit-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    (tmp_path / "jaguar-kit-wheel").symlink_to(real, target_is_directory=True)  # legacy mount as a link
    (real / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = env.find_files(lambda n: n.endswith(".whl"), [tmp_path])
    assert len(found) == 1 and found[0].resolve() == (real / "jaguar_kit-0.1.0-py3-none-any.whl").resolve()
    assert found[0] == tmp_path / "jaguar-kit-wheel" / "jaguar_kit-0.1.0-py3-none-any.whl"  # the shallower path
    paths = [os.path.realpath(f.path) for f in env.walk_inputs([tmp_path, tmp_path / "jaguar-kit-wheel"])]
    assert len(paths) == len(set(paths))  # each real folder once, whatever the roots and links


def test_find_folders_stops_at_a_match_and_uses_the_input_roots(tmp_path, monkeypatch):
    _tree(tmp_path / "a", ["competitions/jaguar-re-id/train/train", "datasets/bob/copy/jaguar-re-id"])
    _tree(tmp_path / "b", ["jaguar-re-id"])
    monkeypatch.setenv("JAGUAR_KIT_INPUT", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    found = env.find_folders(lambda f: f.path.name == "jaguar-re-id" or f.path.name == "train")
    rel = sorted(str(p.relative_to(tmp_path)) for p in found)
    assert rel == ["a/competitions/jaguar-re-id", "a/datasets/bob/copy/jaguar-re-id", "b/jaguar-re-id"]
    # unreadable or missing roots are skipped, not fatal
    assert env.find_folders(lambda f: True, [tmp_path / "missing"]) == []
