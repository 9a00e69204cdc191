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


def test_a_new_kernel_kind_is_one_row_of_the_kernel_table(kernels, tmp_path, monkeypatch):
    # adding a kernel journey: one row (title, upstream kinds, GPU) that metadata and push both read
    monkeypatch.setitem(md.KERNELS, "score", md.KernelKind("Jaguar Re-ID Score", ("infer",), gpu=False))
    stand_in(kernels, "score")
    folder = push.prepare_kernel("score", "alice", tmp_path / "build", kernels_dir=kernels)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "alice/jaguar-re-id-score" and meta["title"] == "Jaguar Re-ID Score"
    assert meta["kernel_sources"] == ["alice/jaguar-re-id-infer"]
    assert meta["enable_gpu"] is False and "machine_shape" not in meta
    assert md.kernel_metadata("submit", "alice")["enable_gpu"] is True  # the others keep their row


@pytest.fixture
def no_kaggle_identity(tmp_path, monkeypatch):
    """No --user, no KAGGLE_USERNAME, no kaggle.json: a fresh machine."""
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    return tmp_path / "home"


def test_user_comes_from_the_flag_then_the_variable_then_kaggle_json(kernels, tmp_path, monkeypatch,
                                                                     no_kaggle_identity):
    with pytest.raises(JaguarKitError, match="no Kaggle user name: pass --user ME, set KAGGLE_USERNAME") as e:
        push.push_kernel("train", None, tmp_path / "b0", dry_run=True, kernels_dir=kernels)
    assert str(no_kaggle_identity / ".kaggle" / "kaggle.json") in str(e.value)
    assert not (tmp_path / "b0" / "train" / "kernel-metadata.json").exists()

    def pushed_id(build: str, user=None) -> str:
        push.push_kernel("train", user, tmp_path / build, dry_run=True, kernels_dir=kernels)
        return json.loads((tmp_path / build / "train" / "kernel-metadata.json").read_text())["id"]

    (no_kaggle_identity / ".config" / "kaggle").mkdir(parents=True)
    (no_kaggle_identity / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "xdg-dave", "key": "k"}')
    assert pushed_id("b1") == "xdg-dave/jaguar-re-id-train"  # the CLI's XDG location
    (no_kaggle_identity / ".kaggle").mkdir()
    (no_kaggle_identity / ".kaggle" / "kaggle.json").write_text('{"username": "dave", "key": "k"}')
    assert pushed_id("b2") == "dave/jaguar-re-id-train"  # ~/.kaggle wins, as in the CLI
    monkeypatch.setenv("KAGGLE_USERNAME", "carol")
    assert pushed_id("b3") == "carol/jaguar-re-id-train"
    assert pushed_id("b4", "alice") == "alice/jaguar-re-id-train"
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text("{not json")
    with pytest.raises(JaguarKitError, match=r"cfg/kaggle.json: not a readable kaggle.json"):
        pushed_id("b5")


def test_sources_from_the_command_line_are_attached_and_validated(kernels, tmp_path, capsys):
    args = ["train", "--user", "alice", "--dry-run", "--kernels-dir", str(kernels), "--build-dir", str(tmp_path / "b"),
            "--model", "bvra/megadescriptor-l-384/pytorch/default/1", "--dataset", "bob/megadescriptor-copy",
            "--kernel", "bob/jaguar-re-id-train", "--kernel", "alice/jaguar-re-id-train", "--resume"]
    assert push.main(args) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "b" / "train" / "kernel-metadata.json").read_text())
    assert meta["model_sources"] == ["bvra/megadescriptor-l-384/pytorch/default/1"]
    assert meta["dataset_sources"] == ["alice/jaguar-kit-wheel", "bob/megadescriptor-copy"]
    assert meta["kernel_sources"] == ["alice/jaguar-re-id-train", "bob/jaguar-re-id-train"]  # listed once
    # a model without its version is refused before anything is pushed (Kaggle would drop it)
    assert push.main([*args[:8], "--model", "bvra/megadescriptor-l-384/pytorch/default"]) == 2
    assert "model_sources 'bvra/megadescriptor-l-384/pytorch/default': expected" in capsys.readouterr().err
    with pytest.raises(JaguarKitError, match="unknown kind 'weights'"):
        push.push_kernel("train", "alice", tmp_path / "b", dry_run=True, kernels_dir=kernels,
                         sources={"weights": ["x/y"]})


def test_jaguar_kit_cli_kaggle_push_takes_the_same_sources(kernels, tmp_path):
    from jaguar_kit.cli import build_parser

    args = build_parser().parse_args(["kaggle", "push", "infer", "--user", "alice", "--dry-run",
                                      "--build", str(tmp_path / "b"), "--model", "o/m/pytorch/v/2",
                                      "--kernel", "bob/jaguar-re-id-train"])
    assert push.sources_from_args(args) == {"models": ["o/m/pytorch/v/2"], "kernels": ["bob/jaguar-re-id-train"]}
    args.kernels_dir = str(kernels)
    args.func(args)
    meta = json.loads((tmp_path / "b" / "infer" / "kernel-metadata.json").read_text())
    assert meta["model_sources"] == ["o/m/pytorch/v/2"]
    assert meta["kernel_sources"] == ["alice/jaguar-re-id-train", "bob/jaguar-re-id-train"]


def test_push_from_a_folder_with_the_repo_root_metadata(tmp_path, monkeypatch):
    """The repository root's kernel-metadata.json (a script) pushes from a build copy, with the
    user's name in place of the placeholder it is kept with."""
    root = tmp_path / "repo"
    md.write_repo_metadata(root)
    stand_in(root / "kernels", "train")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    cmd = push.push_kernel(root, None, tmp_path / "build", dry_run=True)
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


# --------------------------------------------------------------------------- the real kaggle CLI's own checks


@pytest.fixture
def kaggle_api(tmp_path, monkeypatch):
    """The real kaggle CLI's push code, with the one network call replaced by a recorder.

    ``KaggleApi.kernels_push`` reads and checks the folder (metadata, code file, slugs, every
    source's form, the notebook's JSON) and then calls ``save_kernel`` on a client: the client
    is the stub, so everything up to the network runs for real. Sockets are refused too.
    """
    import socket

    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))  # the CLI creates it on import
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("offline test")))
    pytest.importorskip("six")  # kaggle 2.x imports six without declaring it
    from kaggle.api.kaggle_api_extended import KaggleApi

    sent = []

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        class kernels:  # noqa: N801 - mirrors kagglesdk's attribute path
            class kernels_api_client:  # noqa: N801
                @staticmethod
                def save_kernel(request):
                    sent.append(request)
                    return None

    api = KaggleApi()
    monkeypatch.setattr(api, "build_kaggle_client", lambda: Client())
    return api, sent


@pytest.mark.parametrize("kind", md.KINDS)
def test_pushed_folders_pass_the_real_kaggle_cli_checks(kind, tmp_path, kaggle_api, capsys):
    from conftest import REPO

    api, sent = kaggle_api
    folder = push.prepare_kernel(kind, "alice", tmp_path / "build", kernels_dir=REPO / "kernels", resume=True,
                                 sources={"models": ["bvra/megadescriptor-l-384/pytorch/default/1"],
                                          "datasets": ["bob/megadescriptor-copy"]})
    api.kernels_push(str(folder))
    assert "does not resolve to the specified id" not in capsys.readouterr().out  # title slug == id slug
    (req,) = sent
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert req.slug == meta["id"] == f"alice/{md.kernel_slug(kind)}"
    assert req.kernel_type == "notebook" and req.language == "python" and req.enable_internet is True
    assert list(req.model_data_sources) == ["bvra/megadescriptor-l-384/pytorch/default/1"]
    assert list(req.kernel_data_sources) == meta["kernel_sources"] and f"alice/{md.kernel_slug(kind)}" in meta[
        "kernel_sources"]
    assert req.machine_shape == ("NvidiaTeslaT4" if meta["enable_gpu"] else None)
    body = json.loads(req.text)  # the notebook the server receives: our cells, kernelspec, the parameters tag
    assert body["metadata"]["kernelspec"]["name"] == "python3"
    assert any("parameters" in c["metadata"].get("tags", []) for c in body["cells"])


def test_repo_root_metadata_passes_the_real_kaggle_cli_checks(tmp_path, kaggle_api, monkeypatch):
    from conftest import REPO

    api, sent = kaggle_api
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    folder = push.prepare_kernel(REPO, None, tmp_path / "build")
    api.kernels_push(str(folder))
    assert sent[0].slug == "alice/jaguar-re-id-train" and sent[0].kernel_type == "script"
    assert sent[0].text == (REPO / "kernels" / "train.py").read_text()
