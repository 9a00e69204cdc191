"""Kernel and dataset metadata: our kernels' metadata is valid, and each kind of mistake is caught.

A mistake the Kaggle CLI lets through (an invalid source, a missing kernelspec, a
defaulted enable_internet) shows up only hours later on Kaggle; here it is one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.kaggle import metadata as md

REPO = Path(__file__).resolve().parents[1]
USER = "alice"

NOTEBOOK = {
    "cells": [{"cell_type": "code", "metadata": {}, "source": "print(1)", "outputs": [], "execution_count": None}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def folder(tmp_path) -> Path:
    """A build folder holding a notebook with a kernelspec, a bare notebook and a script."""
    (tmp_path / "train.ipynb").write_text(json.dumps(NOTEBOOK))
    bare = copy.deepcopy(NOTEBOOK)
    del bare["metadata"]["kernelspec"]
    (tmp_path / "bare.ipynb").write_text(json.dumps(bare))
    (tmp_path / "train.py").write_text("# %%\nprint(1)\n")
    return tmp_path


@pytest.fixture
def good(folder) -> dict:
    meta = md.kernel_metadata("train", USER)
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=True) == []
    return meta


def _without(key):
    return lambda m: m.pop(key)


def _set(**kv):
    return lambda m: m.update(kv)


BAD = [
    ("no slash in id", _set(id="alice"), "id 'alice': expected 'user/slug'"),
    ("version in id", _set(id="alice/jaguar-re-id-train/3"), "must not contain a version"),
    ("bad slug syntax", _set(id="alice/Jaguar_Re_ID_Train"), "must be lowercase letters, digits and single hyphens"),
    ("bad owner", _set(id="Alice Smith/jaguar-re-id-train"), "must be a Kaggle user name"),
    ("placeholder owner", _set(id=f"{md.PLACEHOLDER_USER}/jaguar-re-id-train"), "replace the placeholder"),
    ("short title", _set(title="Jag"), "at least 5 characters"),
    ("title/slug mismatch", _set(title="Jaguar Re-ID Training"), "differs from the id's slug"),
    ("missing code_file", _without("code_file"), "code_file: missing"),
    ("absent code_file", _set(code_file="nope.ipynb"), "nope.ipynb not found"),
    ("absolute code_file", _set(code_file="/etc/train.ipynb"), "must be a path relative"),
    ("escaping code_file", _set(code_file="../train.ipynb"), "must be a path relative"),
    ("wrong language", _set(language="r"), "language 'r': must be 'python'"),
    ("wrong kernel_type", _set(kernel_type="kaggle"), "kernel_type 'kaggle': must be 'script' or 'notebook'"),
    ("bad boolean", _set(enable_gpu="yes"), "enable_gpu 'yes': must be true/false"),
    ("numeric boolean", _set(is_private=1), "is_private 1: must be true/false"),
    ("missing enable_internet", _without("enable_internet"), "enable_internet: missing"),
    ("dataset source without owner", _set(dataset_sources=["jaguar-kit-wheel"]), "dataset_sources 'jaguar-kit-wheel': expected 'owner/slug'"),
    ("competition source with owner", _set(competition_sources=["kaggle/jaguar-re-id"]), "expected a competition slug"),
    ("short kernel source slug", _set(kernel_sources=["alice/trn"]), "at least 5 characters"),
    ("kernel source bad version", _set(kernel_sources=["alice/jaguar-re-id-train/v2"]), "expected 'owner/slug'"),
    ("sources not a list", _set(dataset_sources="alice/jaguar-kit-wheel"), "dataset_sources: must be a list"),
    ("model source without version", _set(model_sources=["google/gemma/pytorch/2b"]), "owner/model/framework/variation/version"),
    ("GPU without machine_shape", _without("machine_shape"), "machine_shape: missing for a GPU kernel"),
    ("retired P100", _set(machine_shape="NvidiaTeslaP100"), "retired"),
    ("other shape", _set(machine_shape="NvidiaL4"), "run on 'NvidiaTeslaT4'"),
    ("GPU kernel without GPU", _set(enable_gpu=False), "enable_gpu: must be true"),
    ("shape without GPU", _set(enable_gpu="false"), "needs enable_gpu true"),
    ("GPU and TPU", _set(enable_tpu=True), "at most one accelerator"),
    ("notebook without kernelspec", _set(code_file="bare.ipynb"), "no kernelspec"),
    ("notebook given a .py", _set(code_file="train.py"), "pushes an .ipynb"),
    ("script given a notebook", _set(kernel_type="script"), "pushes a .py"),
    ("misspelt field", _set(enable_intenet=False), "unknown field 'enable_intenet'"),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_validator_rejects_each_mistake(good, folder, name, mutate, message):
    meta = copy.deepcopy(good)
    mutate(meta)
    problems = md.validate_kernel_metadata(meta, folder, expect_gpu=True)
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize(
    "change",
    [
        {"is_private": "False", "enable_internet": "true", "enable_gpu": "TRUE"},  # CLI's string booleans
        {"dataset_sources": ["alice/jaguar-kit-wheel/3"], "kernel_sources": ["bob_2/jaguar-re-id-train/12"]},
        {"model_sources": ["google/gemma/pytorch/2b/1"], "competition_sources": []},
        {"kernel_type": "script", "code_file": "train.py"},
    ],
)
def test_validator_accepts_valid_variants(good, folder, change):
    meta = {**good, **change}
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=True) == []


def test_check_raises_one_line_listing_every_problem(good, folder):
    meta = {**good, "language": "r", "enable_gpu": "maybe"}
    with pytest.raises(JaguarKitError) as e:
        md.check_kernel_metadata(meta, folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "kernel-metadata.json") in msg
    assert "language 'r'" in msg and "enable_gpu 'maybe'" in msg
    md.check_kernel_metadata(good, folder)  # a valid one passes silently


@pytest.mark.parametrize("kind", md.KINDS)
def test_generated_kernel_metadata_is_valid_and_wired(folder, kind):
    (folder / f"{kind}.ipynb").write_text(json.dumps(NOTEBOOK))
    meta = md.kernel_metadata(kind, USER)
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=True) == []
    assert meta["kernel_type"] == "notebook" and meta["code_file"] == f"{kind}.ipynb"
    assert meta["enable_internet"] is True and meta["enable_gpu"] is True
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["competition_sources"] == ["jaguar-re-id"]
    assert meta["dataset_sources"] == [f"{USER}/jaguar-kit-wheel"]
    upstream = {"train": set(), "infer": {"train"}, "submit": {"infer", "train"}}[kind]
    assert set(meta["kernel_sources"]) == {f"{USER}/{md.kernel_slug(k)}" for k in upstream}
    offline = md.kernel_metadata(kind, USER, internet=False, gpu=False)
    assert offline["enable_internet"] is False and "machine_shape" not in offline
    assert md.validate_kernel_metadata(offline, folder) == []


def test_kernels_have_distinct_ids_and_titles_that_slugify_to_them():
    ids = {md.kernel_metadata(k, USER)["id"] for k in md.KINDS}
    assert len(ids) == 3
    for k in md.KINDS:
        m = md.kernel_metadata(k, USER)
        assert m["id"] == f"{USER}/{md.slugify(m['title'])}"


def test_slugify_matches_the_kaggle_clis_python_slugify():
    slugify = pytest.importorskip("slugify").slugify
    for title in ["Jaguar Re-ID Train", "  Jaguar -- re_id: v2 (EVA-02 L) ", "Café Jaguar 1,000 épocas", "A's B"]:
        assert md.slugify(title) == slugify(title), title


def test_repository_metadata_files_are_in_sync_with_the_generator():
    for rel, meta in md.repo_metadata().items():
        path = REPO / rel
        assert path.is_file(), f"{rel} missing: run python -m jaguar_kit.kaggle.push --write-metadata ."
        assert path.read_text() == md.render_metadata(meta), (
            f"{rel} is out of date: run python -m jaguar_kit.kaggle.push --write-metadata ."
        )


def test_write_repo_metadata_renders_every_file(tmp_path):
    written = md.write_repo_metadata(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == set(md.repo_metadata())
    for p in written:
        assert json.loads(p.read_text()) == md.repo_metadata()[p.relative_to(tmp_path).as_posix()]


def test_root_metadata_pushes_kernels_train_py_as_a_script(tmp_path):
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "kernels/train.py" and meta["kernel_type"] == "script"
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "train.py").write_text("# %%\nprint(1)\n")
    assert md.validate_kernel_metadata(meta, tmp_path, expect_gpu=True, allow_placeholder=True) == []
    # as kept in the repo it names the placeholder user, which a push must replace
    assert any("replace the placeholder" in p for p in md.validate_kernel_metadata(meta, tmp_path))


def test_root_metadata_valid_against_the_real_kernel():
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    assert md.validate_kernel_metadata(meta, REPO, expect_gpu=True, allow_placeholder=True) == []


# ---------------------------------------------------------------- datasets


def test_generated_dataset_metadata_is_valid():
    meta = md.dataset_metadata(USER)
    assert md.validate_dataset_metadata(meta) == []
    assert meta["id"] == f"{USER}/jaguar-kit-wheel" and meta["licenses"] == [{"name": "CC0-1.0"}]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"title": "Wheel"}, "title 'Wheel': must be 6 to 50 characters"),
        ({"title": "W" * 51}, "must be 6 to 50 characters"),
        ({"id": "alice/wheel"}, "the slug must be 6 to 50 characters"),
        ({"id": "alice/" + "w" * 51}, "the slug must be 6 to 50 characters"),
        ({"id": "jaguar-kit-wheel"}, "expected 'owner/slug'"),
        ({"id": "alice/Jaguar_Kit_Wheel"}, "must be lowercase letters"),
        ({"id": f"{md.PLACEHOLDER_USER}/jaguar-kit-wheel"}, "replace the placeholder"),
        ({"licenses": []}, "exactly one license required, got 0"),
        ({"licenses": [{"name": "CC0-1.0"}, {"name": "Apache-2.0"}]}, "exactly one license required, got 2"),
        ({"licenses": "CC0-1.0"}, "exactly one license required"),
        ({"licenses": [{"title": "CC0"}]}, "expected [{\"name\""),
    ],
)
def test_dataset_validator_rejects_each_mistake(change, message):
    problems = md.validate_dataset_metadata({**md.dataset_metadata(USER), **change})
    assert any(message in p for p in problems), problems
    with pytest.raises(JaguarKitError, match="dataset-metadata.json"):
        md.check_dataset_metadata({**md.dataset_metadata(USER), **change})


def test_resume_attaches_the_kernels_own_previous_output(folder):
    meta = md.kernel_metadata("train", USER, resume=True, extra_kernel_sources=("bob/jaguar-re-id-train",))
    assert meta["kernel_sources"] == [f"{USER}/jaguar-re-id-train", "bob/jaguar-re-id-train"]
    assert md.validate_kernel_metadata(meta, folder, expect_gpu=True) == []
    infer = md.kernel_metadata("infer", USER, resume=True)
    assert infer["kernel_sources"] == [f"{USER}/jaguar-re-id-train", f"{USER}/jaguar-re-id-infer"]
