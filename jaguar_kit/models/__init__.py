"""Re-ID models: backbone catalogue, offline weight loading, GeM/native pooling head.

``import jaguar_kit.models`` is cheap (no torch or timm): the names below load their module
on first use, as ``jaguar_kit`` itself does, so the torch-free ``backbones`` (the catalogue,
and the ``frozen:BACKBONE`` model source: :func:`~.backbones.frozen_source`,
:func:`~.backbones.frozen_backbone`) serve code that must stay light, such as a catalogue
reading which model made it.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_HOME))
