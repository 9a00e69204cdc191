"""Re-ID head: pooling over the backbone's spatial output, a projection with a BatchNorm
neck, and L2-normalised embeddings.

Pooling choices (``ModelConfig.pooling``):

- ``gem`` (default): generalised mean pooling with a learnable exponent p over the patch
  tokens / feature-map cells, in the variant that suits the family: ``gem-signed`` for
  ViT/EVA/Swin, ``gem-clamp`` for CNNs.
- ``gem-clamp``: classic GeM, ``mean(clamp(x, eps)^p)^(1/p)``. Right for CNN maps that
  end in ReLU-like activations; on transformer features (signed, after LayerNorm) the
  clamp discards the negative half of every channel.
- ``gem-signed``: the signed power mean ``s(mean(s(x)|x|^p))`` with ``s(v) = sign(v)|v|^q``
  (q = p inside, 1/p outside). It is odd (pooling -x gives minus the pooled x), equals
  average pooling at p = 1 and tends to the largest-magnitude value (with its sign) as p
  grows, so it keeps GeM's "emphasise strong activations" behaviour without dropping the
  negative half. This is what ``gem`` means for transformers.
- ``native``: the backbone's own head, ``forward_head(pre_logits=True)`` (class token
  after the final norm for DINOv2/EVA, average pooling for Swin and CNNs).

Pooling always runs in float32: p = 3 powers of LayerNorm outputs overflow fp16.
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig, Pooling, check_choice
from ..errors import JaguarKitError
from .backbones import BackboneSpec, get_backbone_spec, with_img_size
from .state_dicts import LoadReport, load_backbone_weights
from .weights import create_backbone

logger = logging.getLogger("jaguar_kit")



class GeM(nn.Module):
    """Generalised mean over dim 1 of (B, N, C) inputs, learnable exponent p.

    ``signed=False``: classic clamped GeM; ``signed=True``: the signed power mean (see
    the module docstring). p is clamped to >= 1 in the forward pass.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, signed: bool = False) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        p = self.p.float().clamp(min=1.0)
        if not self.signed:
            return x.clamp(min=self.eps).pow(p).mean(dim=1).pow(1.0 / p)
        # |x| is clamped so that d|x|^p/dp = |x|^p log|x| stays finite at x = 0.
        m = (torch.sign(x) * x.abs().clamp(min=self.eps).pow(p)).mean(dim=1)
        return torch.sign(m) * m.abs().clamp(min=self.eps).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}, signed={self.signed}"


class GeMPool(nn.Module):
    """Turns a backbone's ``forward_features`` output into (B, N, C) cells and GeM-pools them.

    vit: drops the ``num_prefix_tokens`` class/register tokens of (B, T, C);
    swin: (B, H, W, C); cnn: (B, C, H, W).
    """

    def __init__(self, family: str, num_prefix_tokens: int, p: float = 3.0, signed: bool = False) -> None:
        super().__init__()
        self.family = family
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.gem = GeM(p=p, signed=signed)

    @property
    def p(self) -> nn.Parameter:
        return self.gem.p

    def cells(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch tokens / map cells, without prefix tokens."""
        if feats.ndim == 3:
            return feats[:, self.num_prefix_tokens :]
        if feats.ndim == 4:
            if self.family == "swin":  # NHWC
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)  # NCHW
        raise ValueError(f"unexpected backbone feature shape {tuple(feats.shape)}")

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.gem(self.cells(feats))


class ReIDModel(nn.Module):
    """timm backbone -> pooling -> Linear -> BatchNorm1d -> L2-normalised embedding.

    Attributes: ``backbone`` (the timm module, num_classes=0), ``pool`` (GeMPool, or
    nn.Identity for native pooling), ``neck`` (Sequential(Linear, BatchNorm1d)), ``spec``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        pooling: str = "gem",
        gem_p: float = 3.0,
        embedding_dim: int = 512,
    ) -> None:
        super().__init__()
        check_choice("model.pooling", pooling, Pooling)
        self.backbone = backbone
        self.spec = spec
        self.embedding_dim = int(embedding_dim)
        if pooling == "native":
            self.pooling = "native"
            self.pool: nn.Module = nn.Identity()
            feat_dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        else:
            if pooling == "gem":
                pooling = "gem-clamp" if spec.family == "cnn" else "gem-signed"
            self.pooling = pooling
            self.pool = GeMPool(
                spec.family,
                int(getattr(backbone, "num_prefix_tokens", 0)) if spec.family == "vit" else 0,
                p=gem_p,
                signed=pooling == "gem-signed",
            )
            feat_dim = int(backbone.num_features)
        # Average-pooling ViTs (EVA-02, BEiT) skip the final norm in forward_features and
        # normalise after pooling (fc_norm). For GeM, apply that pretrained norm to every
        # token instead, as the other ViTs do: features stay normalised and fc_norm's
        # parameters stay in use (DDP fails on unused parameters).
        fc_norm = getattr(backbone, "fc_norm", None)
        self.norm_tokens = (
            self.pooling != "native"
            and spec.family == "vit"
            and isinstance(getattr(backbone, "norm", None), nn.Identity)
            and isinstance(fc_norm, nn.Module)
            and not isinstance(fc_norm, nn.Identity)
        )
        self.feature_dim = feat_dim
        # No bias in the Linear: the BatchNorm that follows has its own shift.
        self.neck = nn.Sequential(
            nn.Linear(feat_dim, self.embedding_dim, bias=False), nn.BatchNorm1d(self.embedding_dim)
        )
        self.weights_report: LoadReport | None = None  # what build_model loaded (None: timm/none)
        self.init_report: LoadReport | None = None  # what cfg.init_from loaded

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) float32 pooled backbone features (before the neck)."""
        feats = self.backbone.forward_features(x)
        if self.pooling == "native":
            return self.backbone.forward_head(feats, pre_logits=True).float()
        if self.norm_tokens:
            feats = self.backbone.fc_norm(feats)
        return self.pool(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embedding_dim) float32 L2-normalised embeddings."""
        z = self.neck(self.pooled_features(x))
        return F.normalize(z.float(), dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in every block of the backbone (timm's own checkpointing)."""
        self.set_checkpoint_blocks(0)
        self.backbone.set_grad_checkpointing(enable)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The backbone's blocks in forward order (``blocks.N``, Swin's ``layers.N.blocks.N``,
        EfficientNet's stages ``blocks.N``): the units :meth:`set_checkpoint_blocks` counts."""
        return [m for name, m in self.backbone.named_modules() if _BLOCK_NAME.search(name)]

    def set_checkpoint_blocks(self, n: int) -> None:
        """Recompute the activations of the first ``n`` blocks in backward (0: none; all of them: timm's own).

        The earliest blocks hold the largest activations in hierarchical backbones (Swin's first
        stage works on 16x more tokens than its third), so they go first. timm offers only
        all-or-nothing checkpointing; this wraps each chosen block's ``forward`` on the instance
        (no new modules, so parameter names and checkpoints stay as they are).
        """
        blocks = self.checkpoint_blocks()
        if n > 0 and n >= len(blocks):  # every block: timm's own checkpointing
            self.set_grad_checkpointing(True)
            return
        self.backbone.set_grad_checkpointing(False)
        for i, block in enumerate(blocks):
            block.__dict__.pop("forward", None)  # back to the class's forward
            if i < n:
                block.forward = types.MethodType(_recomputed_forward, block)

    @property
    def data_config(self) -> dict[str, Any]:
        """What the data pipeline must produce: dict(input_size, mean, std)."""
        s = self.spec.img_size
        return dict(input_size=(3, s, s), mean=tuple(self.spec.mean), std=tuple(self.spec.std))


_BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")


def _recomputed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward under ``torch.utils.checkpoint`` while training with gradients.

    Bound to the block as a method (not a closure) so that a deep copy, such as the EMA
    model's, runs its own block and weights.
    """
    forward = type(block).forward.__get__(block)
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def build_model(cfg: ModelConfig) -> ReIDModel:
    """Build the model a ModelConfig describes, with its weights loaded.

    ``cfg.weights`` picks the backbone's starting weights (see ``weights.create_backbone``);
    ``cfg.init_from`` then overwrites the backbone with another run's checkpoint (head
    tensors are not taken: another fold's head has other shapes and classes).
    ``cfg.img_size`` 0 keeps the backbone's native size.
    """
    if cfg.embedding_dim <= 0:
        raise JaguarKitError(f"model.embedding_dim={cfg.embedding_dim}: must be positive")
    if cfg.img_size < 0:
        raise JaguarKitError(f"model.img_size={cfg.img_size}: must be 0 (native) or positive")
    spec = with_img_size(get_backbone_spec(cfg.backbone), cfg.img_size)
    backbone, report = create_backbone(spec, cfg.weights)
    model = ReIDModel(backbone, spec, pooling=cfg.pooling, gem_p=cfg.gem_p, embedding_dim=cfg.embedding_dim)
    model.weights_report = report
    if cfg.init_from:
        model.init_report = load_backbone_weights(model, cfg.init_from)
        logger.info("init_from %s: %s", cfg.init_from, model.init_report.summary())
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    elif cfg.checkpoint_blocks:
        model.set_checkpoint_blocks(cfg.checkpoint_blocks)
    return model


class FrozenBackbone(nn.Module):
    """A pretrained backbone's own pooled features, L2-normalised: the frozen baseline.

    No projection head: nothing here is trained, so the features are exactly what the
    pretrained weights give (and the same in every process, which keeps embedding caches
    valid across runs).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.backbone, self.spec = backbone, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return F.normalize(feats.float(), dim=1)

    data_config = ReIDModel.data_config


def build_frozen_model(backbone: str, weights: str = "auto", img_size: int = 0) -> FrozenBackbone:
    """The backbone ``backbone`` with its pretrained ``weights`` and native pooling, frozen.

    ``img_size`` 0 keeps the backbone's native input size.
    """
    if img_size < 0:
        raise JaguarKitError(f"model.img_size={img_size}: must be 0 (native) or positive")
    spec = with_img_size(get_backbone_spec(backbone), img_size)
    model, _ = create_backbone(spec, weights)
    frozen = FrozenBackbone(model, spec).eval()
    frozen.requires_grad_(False)
    return frozen
