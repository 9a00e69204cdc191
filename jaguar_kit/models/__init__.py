"""Re-ID models: backbone catalogue, offline weight loading, GeM/native pooling head.

``import jaguar_kit.models`` is cheap (no torch or timm): the names below load their module
on first use, as ``jaguar_kit`` itself does, so the torch-free ``backbones`` (the catalogue,
and the ``frozen:BACKBONE`` model source: :func:`~.backbones.frozen_source`,
:func:`~.backbones.frozen_backbone`) serve code that must stay light, such as a catalogue
reading which model made it.
"""

from ..lazy import lazy_exports

_HOME = {  # public name -> the module that defines it
    "BackboneSpec": "backbones",
    "get_backbone_spec": "backbones",
    "list_backbones": "backbones",
    "GeM": "heads",
    "GeMPool": "heads",
    "ReIDModel": "heads",
    "build_model": "heads",
    "FrozenBackbone": "heads",
    "build_frozen_model": "heads",
    "LoadReport": "state_dicts",
    "efficientnet_lite0_state_dict": "state_dicts",
    "load_backbone_weights": "state_dicts",
    "read_state_dict": "state_dicts",
    "create_backbone": "weights",
    "find_hub_copy": "weights",
}

__all__ = list(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
