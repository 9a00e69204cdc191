"""Layer-wise LR decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from jaguar_kit.config import LossConfig, ModelConfig, TrainConfig
from jaguar_kit.losses import ReIDCriterion
from jaguar_kit.models import ReIDModel, build_model, get_backbone_spec
from jaguar_kit.models.backbones import timm_create_kwargs
from jaguar_kit.optim import build_optimizer, build_param_groups, build_scheduler, lr_factor

BASE = 1e-3


def _setup(backbone: str = "tiny-vit"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, weights="none", embedding_dim=16))
    crit = ReIDCriterion(LossConfig(), embedding_dim=16, num_classes=5)
    opt = build_optimizer(model, crit, TrainConfig(lr=BASE, weight_decay=0.05, layer_decay=0.8, head_lr_mult=10.0))
    return model, crit, opt


def _lr_of(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-swin", "tiny-cnn"])
def test_group_lrs_after_first_scheduler_step(backbone: str) -> None:
    model, crit, opt = _setup(backbone)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=0)
    opt.step()
    sched.step()
    f = lr_factor(1, 100, 0)
    lrs = _lr_of(opt)
    names = dict(model.backbone.named_parameters())
    depth = {}
    for n, p in names.items():
        k = math.log(lrs[id(p)] / (BASE * f)) / math.log(0.8)
        assert abs(k - round(k)) < 1e-6, f"{n}: lr {lrs[id(p)]} is not base x 0.8^k"
        depth[n] = round(k)
    # The top layer trains at the base lr, the stem deepest, earlier blocks deeper than later.
    assert min(depth.values()) == 0
    stem = {"tiny-vit": "patch_embed.proj.weight", "tiny-swin": "patch_embed.proj.weight",
            "tiny-cnn": "conv_stem.weight"}
    assert depth[stem[backbone]] == max(depth.values()) > 0
    if backbone == "tiny-vit":
        assert depth["norm.weight"] == 0 and depth["blocks.1.attn.qkv.weight"] == 0
        assert depth["blocks.0.attn.qkv.weight"] == 1 and depth["cls_token"] == 2
    # Head: pooling (GeM p), neck and ArcFace weights at 10x base.
    for p in [model.pool.p, *model.neck.parameters(), crit.arcface.weight]:
        assert lrs[id(p)] == pytest.approx(10 * BASE * f)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * f)
        assert g["initial_lr"] == pytest.approx(BASE * g["lr_scale"])


def test_no_weight_decay_on_1d_params_and_every_param_once() -> None:
    model, crit, opt = _setup("tiny-vit")
    seen: dict[int, float] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = g["weight_decay"]
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0
    trainable = [p for p in [*model.parameters(), *crit.parameters()] if p.requires_grad]
    assert set(seen) == {id(p) for p in trainable}
    assert seen[id(model.pool.p)] == 0.0
    assert seen[id(model.backbone.pos_embed)] == 0.0  # timm's no_weight_decay() list
    assert seen[id(model.backbone.blocks[0].attn.qkv.weight)] == 0.05
    assert seen[id(crit.arcface.weight)] == 0.05


def test_schedule_warmup_cosine_and_ratios_survive() -> None:
    model, crit, opt = _setup("tiny-vit")
    total, warm = 50, 10
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warm)
    init = [g["initial_lr"] for g in opt.param_groups]
    seen = []
    for step in range(total):
        factors = [g["lr"] / i for g, i in zip(opt.param_groups, init)]
        assert max(factors) - min(factors) < 1e-12  # every group follows the same curve
        seen.append(factors[0])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1 / warm)
    assert seen[warm - 1] == pytest.approx(1.0) and seen[warm] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(seen[: warm - 1], seen[1:warm]))
    assert all(a > b for a, b in zip(seen[warm:-1], seen[warm + 1 :]))
    assert 0 < seen[-1] < 0.01
    assert lr_factor(total + 5, total, warm) == pytest.approx(0.0)


def test_head_only_steps_hold_the_backbone_then_fine_tune_it() -> None:
    model, crit, opt = _setup("tiny-vit")
    total, warm, head_only = 40, 4, 10
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warm, head_only_steps=head_only)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    x = torch.randn(6, 3, 64, 64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for step in range(total):
        backbone_lrs = [g["lr"] for g in opt.param_groups if g["name"].startswith("backbone")]
        head_lrs = [g["lr"] / g["initial_lr"] for g in opt.param_groups if g["name"].startswith("head")]
        if step < head_only:
            assert max(backbone_lrs) == 0.0  # a linear probe: the pretrained layers wait
            assert head_lrs[0] == pytest.approx(lr_factor(step, total, warm))
        elif step == head_only:
            # the backbone's own warmup starts now
            assert all(g["lr"] == pytest.approx(g["initial_lr"] / warm) for g in opt.param_groups
                       if g["name"].startswith("backbone"))
        if step == head_only:
            assert all(torch.equal(before[n], p) for n, p in model.backbone.named_parameters())
        loss, _ = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert not all(torch.equal(before[n], p) for n, p in model.backbone.named_parameters())


@pytest.mark.parametrize("name", ["megadescriptor-l-384", "megadescriptor-dinov2-518"])
def test_large_backbones_have_25_layers(name: str) -> None:
    import timm

    spec = get_backbone_spec(name)
    with torch.device("meta"):
        bb = timm.create_model(spec.timm_name, pretrained=False, **timm_create_kwargs(spec))
        model = ReIDModel(bb, spec)
    groups = build_param_groups(model, torch.nn.Identity(), lr=BASE, weight_decay=0.05)
    scales = {round(g["lr_scale"], 12) for g in groups if g["name"].startswith("backbone")}
    assert len(scales) == 25
    assert min(scales) == pytest.approx(0.8**24)
