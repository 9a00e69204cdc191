"""The chunked TTA embedder: resumable, never mixes stale or partial chunks."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_OVERRIDES, run_cli
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import load_competition
from jaguar_kit.data.dataset import build_transform
from jaguar_kit.data.prepare import load_prepared, prepare_images
from jaguar_kit.embed import embed_batch, embed_images
from jaguar_kit.models import build_model


def _tiny_config():
    return apply_overrides(Config(), list(TINY_OVERRIDES))


@pytest.fixture(scope="module")
def setup(competition, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(_tiny_config().model).eval()
    comp = load_competition(competition)
    prepared = prepare_images(list(comp.train["path"][:12]), tmp_path_factory.mktemp("prep"), size=96, workers=0,
                              progress=False)
    names = list(comp.train["filename"][:12])
    return model, names, [prepared[n] for n in names]


def _embed(model, names, paths, cache, **kw):
    kw = {"chunk_size": 5, "batch_size": 4, "progress": False, **kw}
    return embed_images(model, names, paths, cache, torch.device("cpu"), **kw)


def test_rerun_reuses_finished_chunks_and_recomputes_bad_ones(setup, tmp_path):
    model, names, paths = setup
    first = _embed(model, names, paths, tmp_path)
    assert first.computed_chunks == [0, 1, 2] and first.embeddings.shape == (12, 32)
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1, atol=1e-5)
    (tmp_path / "images_00001.npz").unlink()  # a chunk the killed run never finished
    data = (tmp_path / "images_00002.npz").read_bytes()
    (tmp_path / "images_00002.npz").write_bytes(data[: len(data) // 2])  # a truncated chunk
    second = _embed(model, names, paths, tmp_path)
    assert second.reused_chunks == [0] and second.computed_chunks == [1, 2]
    np.testing.assert_allclose(second.embeddings, first.embeddings, atol=1e-6)


def test_other_fingerprint_is_recomputed_not_mixed(setup, tmp_path):
    model, names, paths = setup
    _embed(model, names, paths, tmp_path, tta="flip4")
    assert _embed(model, names, paths, tmp_path, tta="hflip").computed_chunks == [0, 1, 2]
    assert _embed(model, names, paths, tmp_path, tta="hflip", preprocessing={"size": 1}).computed_chunks == [0, 1, 2]
    torch.manual_seed(1)
    other = build_model(_tiny_config().model).eval()  # other weights, same architecture
    assert _embed(other, names, paths, tmp_path, tta="hflip").computed_chunks == [0, 1, 2]


def test_four_flip_tta_is_the_mean_of_the_views(setup):
    model, names, paths = setup
    cfg = model.data_config
    t = build_transform(tuple(cfg["input_size"])[-2:], cfg["mean"], cfg["std"])
    x = torch.stack([t(torch.from_numpy(load_prepared(p)).permute(2, 0, 1)) for p in paths[:3]])
    with torch.no_grad():
        views = [model(x), model(x.flip(-1)), model(x.flip(-2)), model(x.flip(-2, -1))]
    expected = F.normalize(torch.stack([F.normalize(v, dim=1) for v in views]).mean(0), dim=1)
    torch.testing.assert_close(embed_batch(model, x, ("none", "h", "v", "hv")), expected, atol=1e-5, rtol=1e-5)


def test_killed_mid_write_resumes_without_recomputing(competition, tmp_path):
    """A real SIGKILL while the third chunk is being written; the rerun only does chunks 3+."""
    run = tmp_path / "run"
    assert run_cli("train", "--data", competition, "--out", run,
                   overrides=[*TINY_OVERRIDES, "train.epochs=1"]).returncode == 0
    out = tmp_path / "emb"
    embed = ("embed", "--data", competition, "--out", out, "--checkpoint", run / "best.pt", "--split", "train")
    killed = run_cli(*embed, overrides=["embed.chunk_size=5", "embed.tta=flip4"], fault="chunk-write:3")
    assert killed.returncode == -signal.SIGKILL
    (cache,) = (out / "cache").iterdir()  # one folder per model's weights
    done = {p.name: p.stat().st_mtime_ns for p in cache.glob("train-flip4_*.npz")}
    assert sorted(done) == ["train-flip4_00000.npz", "train-flip4_00001.npz"]
    rerun = run_cli(*embed, overrides=["embed.chunk_size=5", "embed.tta=flip4"])
    assert rerun.returncode == 0, rerun.stderr
    assert {n: (cache / n).stat().st_mtime_ns for n in done} == done  # finished chunks untouched
    assert len(list(cache.glob("train-flip4_*.npz"))) == 8  # 36 images / 5 per chunk
    assert not list(cache.glob(".*tmp*"))
