"""Optimiser and schedule: AdamW with layer-wise LR decay, warmup then cosine.

The backbone's layers get ``lr * layer_decay**depth`` (depth 0 = the top layer), so
pretrained early layers move least; the head (pooling incl. GeM p, neck, ArcFace
weights) starts from scratch and gets ``lr * head_lr_mult``. timm's
``param_groups_layer_decay`` only records ``lr_scale``, which only timm's schedulers
apply, so each group's ``lr`` is set here; ``LambdaLR`` then scales every group's own
initial lr, keeping the ratios.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import TrainConfig
    from .models import ReIDModel


def build_param_groups(
    model: "ReIDModel",
    criterion: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 0.8,
    head_lr_mult: float = 10.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per backbone layer and decay kind, plus the head.

    Every group carries ``lr``, ``lr_scale`` (lr / base lr), ``weight_decay`` and a
    ``name``. 1-D parameters (norms, biases, GeM p) and the backbone's own
    ``no_weight_decay()`` names (position embeddings, class tokens) get no weight decay. Frozen
    parameters (requires_grad False) are left out.
    """
    import timm.optim

    groups: list[dict[str, Any]] = []
    # Position embeddings / class tokens: the model's own no-decay list, as timm's
    # create_optimizer_v2 passes it.
    no_wd = getattr(model.backbone, "no_weight_decay", None)
    no_wd_list = sorted(no_wd()) if callable(no_wd) else []
    # Called on the timm module itself: the wrapper has no group_matcher.
    for g in timm.optim.param_groups_layer_decay(
        model.backbone, weight_decay=weight_decay, no_weight_decay_list=no_wd_list, layer_decay=layer_decay
    ):
        scale = float(g["lr_scale"])
        groups.append(
            dict(
                params=list(g["params"]),
                lr=lr * scale,
                lr_scale=scale,
                weight_decay=float(g["weight_decay"]),
                name=f"backbone_scale_{scale:.4g}_{'decay' if g['weight_decay'] else 'no_decay'}",
            )
        )
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    head += [p for p in criterion.parameters() if p.requires_grad]
    decay = [p for p in head if p.ndim > 1]
    no_decay = [p for p in head if p.ndim <= 1]
    for params, wd, name in ((decay, weight_decay, "head_decay"), (no_decay, 0.0, "head_no_decay")):
        if params:
            groups.append(
                dict(params=params, lr=lr * head_lr_mult, lr_scale=float(head_lr_mult), weight_decay=wd, name=name)
            )
    return groups


def build_optimizer(model: "ReIDModel", criterion: nn.Module, train_cfg: "TrainConfig") -> torch.optim.AdamW:
    """AdamW over ``build_param_groups`` with the TrainConfig's lr, decay and multipliers."""
    groups = build_param_groups(
        model,
        criterion,
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        layer_decay=train_cfg.layer_decay,
        head_lr_mult=train_cfg.head_lr_mult,
    )
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of each group's initial lr at optimiser step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` (the first step already learns), then a
    cosine from 1 down to 0 at ``total_steps`` (never negative past it).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, head_only_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warmup, then cosine to 0 at ``total_steps``.

    LambdaLR multiplies each group's own initial lr, so layer-decay ratios survive.
    ``head_only_steps`` > 0 trains the head alone first (the backbone's groups at lr 0: a
    linear probe), then the backbone gets its own warmup and cosine over the remaining
    steps: a randomly initialised head does not push large gradients into pretrained
    layers. Call ``scheduler.step()`` once per optimiser step.
    """
    total, warm, head_only = int(total_steps), int(warmup_steps), int(head_only_steps)

    def head(step: int) -> float:
        return lr_factor(step, total, warm)

    def backbone(step: int) -> float:
        return 0.0 if step < head_only else lr_factor(step - head_only, total - head_only, warm)

    lambdas = [backbone if head_only and str(g.get("name", "")).startswith("backbone") else head
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
