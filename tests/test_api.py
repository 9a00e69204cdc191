"""The top-level Python face: cheap to import, and the README's example runs as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import REPO, cli_env
from photo_layouts import make_layout

import jaguar_kit


def test_import_is_cheap_and_lazy():
    code = ("import sys, jaguar_kit as jk\n"
            "heavy = [m for m in ('torch', 'numpy', 'pandas', 'cv2', 'timm') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert {'load_model', 'identify', 'cluster', 'build_catalogue'} <= set(dir(jk))\n"
            "assert callable(jk.cluster) and jk.cluster.__module__ == 'jaguar_kit.photos.cluster'\n"
            "import jaguar_kit.embed\n"
            "assert callable(jk.embed_photos) and callable(jk.cluster)  # submodules do not shadow the calls\n"
            "print(jk.__version__)\n")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == jaguar_kit.__version__


def test_unknown_attribute_is_an_attribute_error():
    try:
        jaguar_kit.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own photos", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_example_runs(competition, tmp_path):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 11  # the import and ten lines
    layout = make_layout(competition, tmp_path / "eco")
    shutil.copytree(layout.photos, tmp_path / "photos")
    shutil.copytree(layout.unlabelled, tmp_path / "new_photos")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "catalogue" / "catalogue.npz").is_file()
    out = r.stdout
    assert "decision" in out and "group" in out and "false_merge" in out and "auroc_known_vs_new" in out
    for name in layout.truth:
        assert name in out  # every new photo is listed


def test_cluster_caches_in_the_catalogue_not_the_working_folder(competition, tmp_path, monkeypatch):
    """jk.cluster after jk.identify on one catalogue embeds nothing again, and writes nothing where it runs."""
    from photo_layouts import shared_model

    layout = make_layout(competition, tmp_path / "eco")
    cat = jaguar_kit.build_catalogue(layout.photos, shared_model(), tmp_path / "catalogue", progress=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    jaguar_kit.identify(cat, layout.unlabelled, model=shared_model(), progress=False)
    cache = tmp_path / "catalogue" / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    res = jaguar_kit.cluster(layout.unlabelled, catalogue=cat, model=shared_model(), progress=False)
    assert len(res.table) == len(layout.truth)
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert after == before  # every photo was prepared and embedded by identify already
    assert list(work.iterdir()) == []
    # without a catalogue: the user's cache folder, never the working folder
    jaguar_kit.cluster(layout.unlabelled, model=shared_model(), threshold=0.9, progress=False)
    assert list(work.iterdir()) == [] and any((tmp_path / "user-cache" / "jaguar_kit").rglob("*.npz"))
