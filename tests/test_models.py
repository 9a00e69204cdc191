"""Backbone catalogue, pooling and the ReID model (tiny timm configs, CPU)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from jaguar_kit.config import ModelConfig
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.models import GeM, ReIDModel, build_model, get_backbone_spec, list_backbones
from jaguar_kit.models.backbones import timm_create_kwargs

TINY = ["tiny-vit", "tiny-swin", "tiny-cnn"]
POOLINGS = ["gem", "gem-signed", "gem-clamp", "native"]


def _tiny(backbone: str, **kw) -> ReIDModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, weights="none", embedding_dim=16, **kw))


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("backbone", TINY)
def test_embeddings_are_unit_vectors_and_every_parameter_trains(backbone: str, pooling: str) -> None:
    model = _tiny(backbone, pooling=pooling)
    size = model.data_config["input_size"][-1]
    x = torch.randn(4, 3, size, size)
    emb = model(x)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    # Every trainable parameter is in the graph (DDP with find_unused_parameters=False
    # requires it), GeM's p included, and gradients are finite.
    (emb * torch.randn_like(emb)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gem_resolves_per_family() -> None:
    assert _tiny("tiny-vit").pooling == "gem-signed"
    assert _tiny("tiny-swin").pooling == "gem-signed"
    assert _tiny("tiny-cnn").pooling == "gem-clamp"


def test_vit_gem_ignores_class_and_register_tokens() -> None:
    model = _tiny("tiny-vit").eval()
    assert model.pool.num_prefix_tokens == 5 == model.spec.num_prefix_tokens  # 1 class + 4 registers
    feats = model.backbone.forward_features(torch.randn(2, 3, 64, 64))
    assert feats.shape[1] == 5 + (64 // 8) ** 2
    changed = feats.clone()
    changed[:, :5] = 1e3
    torch.testing.assert_close(model.pool(changed), model.pool(feats))
    changed[:, 5] += 1.0
    assert not torch.allclose(model.pool(changed), model.pool(feats))


def test_swin_and_cnn_layouts_pool_every_cell() -> None:
    swin, cnn = _tiny("tiny-swin"), _tiny("tiny-cnn")
    nhwc = torch.randn(2, 4, 4, 64)
    assert swin.pool.cells(nhwc).shape == (2, 16, 64)
    nchw = torch.rand(2, 256, 3, 5)
    torch.testing.assert_close(cnn.pool.cells(nchw)[:, 6], nchw[:, :, 1, 1])


def test_gem_formulas() -> None:
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    clamp, signed = GeM(p=3.0), GeM(p=3.0, signed=True)
    expected = x.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
    torch.testing.assert_close(clamp(x), expected.float())
    # Signed GeM is odd, keeps the negative half and is the plain mean at p = 1.
    torch.testing.assert_close(signed(-x), -signed(x))
    neg = -x.abs() - 0.1
    assert (signed(neg) < -0.1).all() and (clamp(neg) < 1e-5).all()
    torch.testing.assert_close(GeM(p=1.0, signed=True)(x), x.mean(1).float())
    # A large p approaches the largest-magnitude value, sign included.
    big = GeM(p=60.0, signed=True)(x)
    idx = x.abs().argmax(1, keepdim=True)
    torch.testing.assert_close(big, x.gather(1, idx).squeeze(1).float(), rtol=0.05, atol=0.02)


def test_gem_is_float32_under_autocast() -> None:
    gem = GeM(p=3.0, signed=True)
    x = (torch.randn(2, 9, 4) * 50).to(torch.bfloat16)  # 50^3 overflows nothing in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gem(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", TINY)
def test_native_pooling_is_the_backbones_own_head(backbone: str) -> None:
    model = _tiny(backbone, pooling="native").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.pooled_features(x), ref)
        assert model.pooled_features(x).shape[1] == model.feature_dim


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-swin"])
def test_img_size_override_reaches_timm(backbone: str) -> None:
    model = _tiny(backbone, img_size=96)
    assert model.data_config["input_size"] == (3, 96, 96)
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 16)


def test_data_config_follows_spec() -> None:
    model = _tiny("tiny-cnn")
    spec = get_backbone_spec("tiny-cnn")
    assert model.data_config == dict(input_size=(3, 64, 64), mean=spec.mean, std=spec.std)
    assert get_backbone_spec("efficientnet-lite0").mean == (0.5, 0.5, 0.5)


def test_grad_checkpointing_keeps_outputs() -> None:
    model = _tiny("tiny-vit").eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    model.neck[1].eval()  # BatchNorm in eval so both passes compute the same function
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-swin"])
def test_checkpointing_some_blocks_keeps_outputs_gradients_and_names(name, monkeypatch) -> None:
    torch.manual_seed(0)
    model = _tiny(name).train()
    model.neck[1].eval()  # BatchNorm in eval so every pass computes the same function
    blocks = model.checkpoint_blocks()
    assert len(blocks) >= 2
    names = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)

    def grads():  # the same drop-path draws on every pass
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_out, ref_grads = grads()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_checkpoint_blocks(1)
    out, got = grads()
    assert len(calls) == 1  # the first block only
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, ref_grads):
        torch.testing.assert_close(a, b)
    assert list(model.state_dict()) == names  # no wrapper modules: checkpoints load as before
    calls.clear()
    with torch.no_grad():
        model(x)
    assert calls == []  # inference never recomputes
    # a deep copy (the EMA model) runs its own weights, not the original's
    twin = copy.deepcopy(model)
    fresh = _tiny(name).eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        fresh.load_state_dict(twin.state_dict())
        torch.testing.assert_close(twin.eval()(x), fresh(x))
    model.set_checkpoint_blocks(0)
    grads()
    assert calls == []


def test_catalogue_names() -> None:
    names = list_backbones()
    for n in ["megadescriptor-l-384", "megadescriptor-dinov2-518", "eva02-l-448", "dinov2-l-reg4-518",
              "efficientnet-lite0", "tiny-vit", "tiny-swin", "tiny-cnn"]:
        assert n in names
    md = get_backbone_spec("megadescriptor-l-384")
    assert (md.timm_name, md.img_size, md.hf_hub, md.family, md.resize) == (
        "swin_large_patch4_window12_384", 384, "BVRA/MegaDescriptor-L-384", "swin", "squash")


@pytest.mark.parametrize("name", ["eva02-l-448", "dinov2-l-reg4-518", "efficientnet-lite0"])
def test_catalogue_matches_timm_pretrained_cfg(name: str) -> None:
    """Input size and normalisation agree with what the weights were trained with."""
    import timm

    spec = get_backbone_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert cfg.input_size[-1] == spec.img_size
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std


@pytest.mark.parametrize(
    "name,shape",
    [
        ("megadescriptor-l-384", (2, 12, 12, 1536)),
        ("megadescriptor-dinov2-518", (2, 1370, 1024)),
        ("dinov2-l-reg4-518", (2, 1374, 1024)),
        ("eva02-l-448", (2, 1025, 1024)),
    ],
)
def test_real_backbones_resolve_on_meta_device(name: str, shape: tuple[int, ...]) -> None:
    """Full-size architectures build (no memory, no weights) and give the expected layout."""
    import timm

    spec = get_backbone_spec(name)
    with torch.device("meta"):
        bb = timm.create_model(spec.timm_name, pretrained=False, **timm_create_kwargs(spec))
        model = ReIDModel(bb, spec)
        x = torch.empty(2, 3, spec.img_size, spec.img_size)
        assert tuple(bb.forward_features(x).shape) == shape
        assert tuple(model(x).shape) == (2, 512)
    if spec.family == "vit":
        assert model.pool.num_prefix_tokens == spec.num_prefix_tokens


def test_any_timm_name_gets_a_spec() -> None:
    spec = get_backbone_spec("convnext_tiny.fb_in1k")
    assert (spec.family, spec.img_size, spec.hf_hub) == ("cnn", 224, "timm/convnext_tiny.fb_in1k")
    reg = get_backbone_spec("vit_small_patch14_reg4_dinov2")
    assert (reg.family, reg.num_prefix_tokens, reg.img_size) == ("vit", 5, 518)
    assert get_backbone_spec("swinv2_tiny_window8_256").family == "swin"
    with pytest.raises(JaguarKitError, match="not_a_model"):
        get_backbone_spec("not_a_model")
    with pytest.raises(JaguarKitError, match="convnext_tiny.nope"):
        get_backbone_spec("convnext_tiny.nope")


def test_bad_pooling_is_one_line_error() -> None:
    with pytest.raises(JaguarKitError, match="model.pooling"):
        build_model(ModelConfig(backbone="tiny-cnn", weights="none", pooling="max"))


@pytest.mark.parametrize(
    "name,cells,channels",
    [
        ("convnext_tiny", 49, 768),
        ("swinv2_tiny_window8_256", 64, 768),
        ("swinv2_cr_tiny_224", 49, 768),  # NCHW despite the name
        ("deit_base_distilled_patch16_224", 196, 768),  # class + distillation token
    ],
)
def test_other_timm_names_pool_the_right_cells(name: str, cells: int, channels: int) -> None:
    import timm

    spec = get_backbone_spec(name)
    with torch.device("meta"):
        bb = timm.create_model(spec.timm_name, pretrained=False, **timm_create_kwargs(spec))
        model = ReIDModel(bb, spec, embedding_dim=8)
        x = torch.empty(2, 3, spec.img_size, spec.img_size)
        assert tuple(model.pool.cells(bb.forward_features(x)).shape) == (2, cells, channels)
        assert tuple(model(x).shape) == (2, 8)


def _tiny_eva() -> ReIDModel:
    """EVA-02 layout (average pooling: no final norm, fc_norm after pooling), shrunk."""
    import timm

    spec = get_backbone_spec("eva02-l-448")
    spec = replace(spec, name="tiny-eva", img_size=56, timm_kwargs=dict(embed_dim=32, depth=2, num_heads=2))
    torch.manual_seed(0)
    bb = timm.create_model(spec.arch, pretrained=False, **timm_create_kwargs(spec))
    return ReIDModel(bb, spec, embedding_dim=8)


@pytest.mark.parametrize("pooling", ["gem", "native"])
def test_eva_layout_uses_every_parameter(pooling: str) -> None:
    """DDP (find_unused_parameters=False) needs every trainable parameter in the graph."""
    model = _tiny_eva()
    if pooling == "native":
        model = ReIDModel(model.backbone, model.spec, pooling="native", embedding_dim=8)
    emb = model(torch.randn(3, 3, 56, 56))
    (emb * torch.randn_like(emb)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_eva_gem_uses_its_pretrained_norm_on_tokens() -> None:
    model = _tiny_eva()
    assert model.norm_tokens
    x = torch.randn(2, 3, 56, 56)
    feats = model.backbone.fc_norm(model.backbone.forward_features(x))
    torch.testing.assert_close(model.pooled_features(x), model.pool(feats))
