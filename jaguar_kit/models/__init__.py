"""Re-ID models: backbone catalogue, offline weight loading, GeM/native pooling head."""

from .backbones import BackboneSpec, get_backbone_spec, list_backbones
from .heads import FrozenBackbone, GeM, GeMPool, ReIDModel, build_frozen_model, build_model
from .state_dicts import LoadReport, efficientnet_lite0_state_dict, load_backbone_weights, read_state_dict
from .weights import create_backbone, find_hub_copy

__all__ = [
    "BackboneSpec",
    "get_backbone_spec",
    "list_backbones",
    "GeM",
    "GeMPool",
    "ReIDModel",
    "build_model",
    "FrozenBackbone",
    "build_frozen_model",
    "LoadReport",
    "create_backbone",
    "efficientnet_lite0_state_dict",
    "find_hub_copy",
    "load_backbone_weights",
    "read_state_dict",
]
