"""One way to get an embedding model: ``load_model(source)`` for a checkpoint or ``frozen:BACKBONE``.

Every model setting that applies to the source is honoured and a set one that cannot be is
refused by name, so no setting is silently ignored:

- ``frozen:NAME``: backbone NAME's pretrained features through its own pooling, nothing
  trained. ``model.weights`` and ``model.img_size`` apply. ``model.init_from`` (another run's
  backbone) is refused: no frozen source rebuilds it. The head's settings (pooling, gem_p,
  embedding_dim) shape the head a training adds and are not read: the config that trains a
  model embeds its frozen baseline too.
- a training checkpoint (``best.pt``): the model is the one its run trained, at the input
  size it trained at; ``model.img_size`` set to another size is refused. ``model.weights``
  and ``model.init_from`` are where a training starts (the checkpoint carries the weights).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..errors import JaguarKitError
from ..train.checkpoint import read_checkpoint
from .backbones import frozen_backbone, get_backbone_spec, with_img_size
from .heads import build_frozen_model, build_model


def load_model(source: str | Path, cfg: Config | None = None, device: str | torch.device = "cpu",
               use_ema: bool = True) -> tuple[nn.Module, Config]:
    """``(model in eval mode on device, its config)`` for a checkpoint or ``frozen:BACKBONE`` source.

    ``cfg`` holds the requested settings (None: the defaults). The config returned is the
    checkpoint's own, or for ``frozen:`` a copy of ``cfg`` whose ``model.backbone`` is the
    source's. Nothing is fetched for a checkpoint: the backbone is built without pretrained weights.
    """
    backbone = frozen_backbone(source)
    if backbone is not None:
        run_cfg = copy.deepcopy(cfg) if cfg is not None else Config()
        m = run_cfg.model
        if m.init_from:
            raise JaguarKitError(f"{source}: model.init_from={m.init_from} does not apply to a frozen backbone "
                                 "(it is the pretrained one); embed that run's checkpoint instead")
        m.backbone = backbone
        model = build_frozen_model(backbone, m.weights, m.img_size)
    else:
        ckpt = read_checkpoint(source)
        run_cfg = ckpt.run_config
        _check_img_size(source, cfg, run_cfg)
        run_cfg.model.weights, run_cfg.model.init_from = "none", ""
        model = build_model(run_cfg.model)
        model.load_state_dict(ckpt.weights(use_ema))
    return model.to(device).eval(), run_cfg


def _check_img_size(source: str | Path, cfg: Config | None, run_cfg: Config) -> None:
    """Refuse a ``model.img_size`` the checkpoint was not trained at (0 asks for none)."""
    wanted = cfg.model.img_size if cfg is not None else 0
    trained = with_img_size(get_backbone_spec(run_cfg.model.backbone), run_cfg.model.img_size).img_size
    if wanted and wanted != trained:
        raise JaguarKitError(f"{source}: model.img_size={wanted} does not apply: this checkpoint was trained at "
                             f"{trained} and embeds at it; drop the setting, or train at {wanted}")
