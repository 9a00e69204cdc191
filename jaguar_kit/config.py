"""One typed configuration tree for a run.

A run is described by one :class:`Config`. It is saved next to every artifact, loaded
from JSON or YAML, and overridden from the command line as ``section.key=value``.
Unknown keys and wrong types are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import JaguarKitError


@dataclass
class DataConfig:
    alpha_mode: str = "crop"  # crop | blank | ignore: how the RGBA mask is used
    crop_margin: float = 0.05  # crop: margin around the mask's box, share of its size
    prepared_size: int = 768  # longest side of images in the prepared cache
    num_folds: int = 5
    fold: int = 0
    split: str = "stratified"  # stratified (closed-set, like the test) | identity (open-set)
    seed: int = 42
    workers: int = 2  # processes for `prepare` and data-loader workers


@dataclass
class ModelConfig:
    backbone: str = "megadescriptor-l-384"  # a catalogue name or any timm name
    weights: str = "auto"  # auto | none | hf-hub:ORG/NAME | a folder | a weights file
    img_size: int = 0  # 0: the backbone's native size
    pooling: str = "gem"  # gem (signed for transformers, clamped for CNNs) | gem-signed | gem-clamp | native
    gem_p: float = 3.0
    embedding_dim: int = 512
    grad_checkpointing: bool = False
    init_from: str = ""  # a checkpoint whose backbone starts this run (another fold/variant)


@dataclass
class LossConfig:
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    arcface_weight: float = 1.0
    triplet_margin: float = 0.3  # 0: soft-margin triplet
    triplet_weight: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 20
    p: int = 8  # identities per batch
    k: int = 4  # images per identity
    steps_per_epoch: int = 0  # 0: one pass over the training images
    lr: float = 5e-5  # top backbone layer; lower layers decay, the head gets x head_lr_mult
    layer_decay: float = 0.8
    head_lr_mult: float = 10.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0: off
    ema_decay: float = 0.0  # 0: off
    patience: int = 5  # early stopping, in epochs
    min_delta: float = 0.001
    augment: str = "light"  # none | light
    hflip: bool = False  # jaguar flanks differ left to right: off by default
    time_budget_h: float = 11.5  # stop with a checkpoint before Kaggle's 12 h limit
    resume: str = "auto"  # auto | never | PATH to a checkpoint
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 42
    val_every: int = 1
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: epoch ends + every 15 min)
    deterministic: bool = False


@dataclass
class EmbedConfig:
    chunk_size: int = 100
    tta: str = "flip4"  # flip4 (none, h, v, hv) | hflip (none, h) | none
    batch_size: int = 32  # images per forward pass, TTA views included
    cache_dir: str = ""  # "": /kaggle/working/cache on Kaggle, RUN/cache elsewhere


@dataclass
class RetrievalConfig:
    query_expansion_k: int = 0  # 0: off
    query_expansion_alpha: float = 3.0
    rerank: bool = True
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3  # weight of the original distance in k-reciprocal re-ranking
    rerank_blend: float = 1.0  # 1: re-ranked only, 0: raw cosine only


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, sections: tuple[str, ...] = ("data", "model", "loss", "train")) -> str:
        """Hash of what decides a training run's result (not paths or budgets).

        Resume only continues a checkpoint with the same fingerprint.
        """
        d = self.to_dict()
        ignored = {"train": {"resume", "time_budget_h", "checkpoint_every", "device"}, "data": {"workers"}}
        picked = {s: {k: v for k, v in d[s].items() if k not in ignored.get(s, ())} for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _coerce(value: Any, typ: Any, where: str, source: str = "config") -> Any:
    """Check ``value`` against a field type; strings from the command line are parsed."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str}[typ]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise JaguarKitError(f"{source}: {where} must be {typ.__name__}, got {value!r}")


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_from_dict(d: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from a (possibly partial) nested dict; unknown keys are errors."""
    cfg = base if base is not None else Config()
    if not isinstance(d, dict):
        raise JaguarKitError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    sections = _section_types(Config)
    for sec_name, values in d.items():
        if sec_name not in sections:
            raise JaguarKitError(f"{source}: unknown section {sec_name!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise JaguarKitError(f"{source}: section {sec_name!r} must be a mapping")
        section = getattr(cfg, sec_name)
        types_ = _section_types(type(section))
        for key, value in values.items():
            if key not in types_:
                raise JaguarKitError(
                    f"{source}: unknown key {sec_name}.{key} (known: {', '.join(types_)})"
                )
            setattr(section, key, _coerce(value, types_[key], f"{sec_name}.{key}", source))
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a JSON or YAML config file (a partial one fills in defaults)."""
    path = Path(path)
    if not path.is_file():
        raise JaguarKitError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise JaguarKitError(f"{path}: cannot parse config: {str(e).splitlines()[0]}") from e
    return config_from_dict(data, source=str(path))


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``section.key=value`` strings (from ``--set``)."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise JaguarKitError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        config_from_dict({section.strip(): {key.strip(): value}}, base=cfg, source="--set")
    return cfg


__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "TrainConfig",
    "EmbedConfig",
    "RetrievalConfig",
    "config_from_dict",
    "load_config",
    "apply_overrides",
]
