"""One typed configuration tree for a run.

A run is described by one :class:`Config`. It is saved next to every artifact, loaded
from JSON or YAML, and overridden from the command line as ``section.key=value``.
Unknown keys and wrong types are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import JaguarKitError

# Field metadata: "logistics" fields (where and how a run executes, not what it computes) are
# left out of the config fingerprint, so changing them never blocks resuming a run.
LOGISTICS = {"logistics": True}


# The settings that take one of a few values. Each stage checks its argument against the same
# type (check_choice), so the command line, a config file and the Python API give one message.
AlphaMode = Literal["crop", "blank", "ignore"]
FoldMode = Literal["stratified", "identity"]
Pooling = Literal["gem", "gem-signed", "gem-clamp", "native"]
Augment = Literal["none", "light"]
Tta = Literal["flip4", "hflip", "none"]


def check_choice(setting: str, value: Any, choices: Any, source: str = "") -> Any:
    """``value`` if it is one of the ``Literal`` type ``choices``, else a one-line error naming ``setting``."""
    allowed = typing.get_args(choices)
    if value in allowed:
        return value
    raise JaguarKitError(f"{source + ': ' if source else ''}{setting}={value!r}: expected one of "
                         f"{', '.join(map(str, allowed))}")


def logistics(default: Any) -> Any:
    """A config field that does not change a run's result (workers, device, budgets, paths)."""
    return field(default=default, metadata=LOGISTICS)


@dataclass
class DataConfig:
    alpha_mode: AlphaMode = "crop"  # how the RGBA mask is used
    crop_margin: float = 0.05  # crop: margin around the mask's box, share of its size
    prepared_size: int = 768  # longest side of images in the prepared cache
    num_folds: int = 5  # cross-validation folds
    fold: int = 0  # the validation fold; -1 trains on every image (the final model)
    split: FoldMode = "stratified"  # stratified: closed-set, like the test; identity: open-set
    seed: int = 42  # fold assignment
    workers: int = logistics(2)  # processes for `prepare` and data-loader workers


@dataclass
class ModelConfig:
    backbone: str = "megadescriptor-l-384"  # a catalogue name or any timm name
    weights: str = "auto"  # auto | none | hf-hub:ORG/NAME | a folder | a weights file
    img_size: int = 0  # 0: the backbone's native size
    pooling: Pooling = "gem"  # gem: signed for transformers, clamped for CNNs
    gem_p: float = 3.0  # initial GeM exponent (learnt)
    embedding_dim: int = 512  # size of the L2-normalised embedding
    grad_checkpointing: bool = logistics(False)  # recompute activations in backward: less memory, same result
    checkpoint_blocks: int = logistics(0)  # recompute only the first N blocks (the GPU memory probe sets it)
    init_from: str = ""  # a checkpoint whose backbone starts this run (another fold/variant)


@dataclass
class LossConfig:
    arcface_scale: float = 30.0  # ArcFace logit scale s
    arcface_margin: float = 0.5  # ArcFace additive angular margin m (radians)
    arcface_weight: float = 1.0  # weight of the ArcFace term
    triplet_margin: float = 0.3  # 0: soft-margin triplet
    triplet_weight: float = 1.0  # weight of the batch-hard triplet term


@dataclass
class TrainConfig:
    epochs: int = 20  # raising it on a finished run extends it from last.pt
    p: int = 8  # identities per batch
    k: int = 4  # images per identity
    steps_per_epoch: int = 0  # 0: one pass over the training images
    lr: float = 5e-5  # top backbone layer; lower layers decay, the head gets x head_lr_mult
    layer_decay: float = 0.8  # lr multiplier per backbone layer, going down
    head_lr_mult: float = 10.0  # head lr = top backbone lr x this
    weight_decay: float = 0.05  # AdamW, not on norms, biases or GeM p
    warmup_epochs: float = 1.0  # linear warm-up, then cosine to 0
    head_epochs: float = 2.0  # the head alone first (backbone lr 0: a linear probe), then all (benchmarks/results/finetune.json)
    grad_accum: int = 1  # batches per optimiser step
    clip_grad: float = 1.0  # 0: off
    ema_decay: float = 0.99  # weight averaging, validated and saved as the model; 0: off (benchmarks/results/finetune.json)
    patience: int = 5  # early stopping, in epochs
    min_delta: float = 0.001
    augment: Augment = "light"  # training augmentation
    hflip: bool = False  # jaguar flanks differ left to right: off by default
    time_budget_h: float = logistics(11.5)  # stop with a checkpoint before Kaggle's 12 h limit
    resume: str = logistics("auto")  # auto | never | PATH to a checkpoint
    device: str = logistics("auto")  # auto | cpu | cuda | cuda:N
    seed: int = 42  # batches, augmentation, initialisation
    val_every: int = 1  # validate every N epochs (and after the last)
    checkpoint_every: int = logistics(0)  # optimizer steps between mid-epoch checkpoints (0: epoch ends + every 15 min)
    accept_data_change: bool = logistics(False)  # resume although train.csv changed (same identities)
    deterministic: bool = False  # torch deterministic algorithms (slower on GPU)


@dataclass
class EmbedConfig:
    chunk_size: int = 100  # images per cached .npz chunk (the unit a killed run loses)
    tta: Tta = "none"  # none | hflip (none, h) | flip4 (none, h, v, hv): flips gained nothing beyond noise on validation (benchmarks/results/accuracy.json) and cost 2-4x; `jaguar-kit tune` measures them
    batch_size: int = 32  # images per forward pass, TTA views included
    cache_dir: str = ""  # "": /kaggle/working/cache on Kaggle, RUN/cache elsewhere


@dataclass
class RetrievalConfig:
    query_expansion_k: int = 0  # 0: off
    query_expansion_alpha: float = 3.0  # weight = similarity ** alpha
    rerank: bool = True  # k-reciprocal re-ranking (Zhong et al. 2017)
    k1: int = 20  # re-ranking: k-reciprocal neighbourhood size
    k2: int = 6  # re-ranking: local query expansion size
    lambda_value: float = 0.3  # weight of the original distance in k-reciprocal re-ranking
    rerank_blend: float = 1.0  # 1: re-ranked only, 0: raw cosine only
    # Local-feature verification (retrieval/verify.py) fused by a logistic calibration (retrieval/fusion.py):
    # p(same) = sigmoid(fusion_bias + fusion_global * g + local_weight * (fusion_inliers * log(1 + inliers)
    # + fusion_ratio * inlier_ratio)), g the similarity above; `jaguar-kit tune` fits the fusion_* values.
    local_verify: bool = False  # re-rank each query's top local_k images by local matches (needs the images)
    local_k: int = 20  # shortlist per query checked with local features
    local_size: int = 640  # longest side (px) of the animal crop the SIFT features are taken from
    local_features: int = 1000  # most SIFT keypoints kept per image
    local_weight: float = 1.0  # multiplies the local terms of the fusion (0: the global order)
    fusion_bias: float = 0.0  # logistic calibration: intercept
    fusion_global: float = 0.0  # logistic calibration: weight of the global similarity
    fusion_inliers: float = 0.0  # logistic calibration: weight of log(1 + RANSAC inliers)
    fusion_ratio: float = 0.0  # logistic calibration: weight of inliers / ratio-test matches


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
        """Hash of what decides a training run's result (not paths or budgets): equal for two
        configs that train the same run (the resume check names the differing settings themselves)."""
        picked = {s: values for s, values in self.result_fields(sections).items()}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def result_fields(self, sections: tuple[str, ...] = ("data", "model", "loss", "train")) -> dict[str, dict[str, Any]]:
        """The values that decide a run's result: every field but the logistics ones."""
        out = {}
        for s in sections:
            section = getattr(self, s)
            out[s] = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
                      if not f.metadata.get("logistics")}
        return out

    def save(self, path: str | Path) -> None:
        from .files import atomic_write_text  # files imports numpy: the config (and the CLI's parser) stays light

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _coerce(value: Any, typ: Any, where: str, source: str = "config") -> Any:
    """Check ``value`` against a field type; strings from the command line are parsed."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str}[typ]
    if typing.get_origin(typ) is Literal:
        return check_choice(where, value, typ, source)
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
    """Build a Config from a (possibly partial) nested dict; unknown keys are errors.

    A top-level key starting with ``_`` is a note for people (JSON has no comments) and is skipped.
    """
    cfg = base if base is not None else Config()
    if not isinstance(d, dict):
        raise JaguarKitError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    sections = _section_types(Config)
    for sec_name, values in d.items():
        if str(sec_name).startswith("_"):
            continue
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
            value = _coerce(value, types_[key], f"{sec_name}.{key}", source)
            _check_range(f"{sec_name}.{key}", value, source)
            setattr(section, key, value)
    return cfg


# Settings whose type admits values that make no sense, refused when parsed: (allowed?, what is allowed).
_RANGES: dict[str, tuple[Any, str]] = {
    "train.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1): 0 turns weight averaging off; at 1 the averaged weights, "
                                              "which are validated, saved and embedded, would never move"),
}


def _check_range(setting: str, value: Any, source: str) -> None:
    rule = _RANGES.get(setting)
    if rule and not rule[0](value):
        raise JaguarKitError(f"{source}: {setting}={value!r} must be {rule[1]}")


def load_config(path: str | Path) -> Config:
    """Read a JSON or YAML config file (a partial one fills in defaults)."""
    path = Path(path)
    if not path.is_file():
        raise JaguarKitError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JaguarKitError(f"{path}: not a config file (JSON or YAML text); a checkpoint such as best.pt is "
                             "passed with --checkpoint or --model, not --config") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # optional (PyYAML): only a .yaml config needs it

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise JaguarKitError(f"{path}: cannot parse config: {str(e).splitlines()[0]}") from e
    return config_from_dict(data, source=str(path))


def diff_configs(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """``(section.key, old, new)`` for every value that differs between two config dicts."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        out += [(f"{section}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source (the config's documentation)."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source shipped: the listing still has names and defaults
        return comments
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1].strip()
            name = line.split(":", 1)[0].strip()
            if name.isidentifier() and ":" in line and not line.startswith("#"):
                comments[name] = tok.string.lstrip("# ").strip()
    return comments


def describe_config(cfg: Config | None = None) -> str:
    """Every key with its value and comment: what ``jaguar-kit config`` prints."""
    cfg = cfg or Config()
    rows = []
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        comments = _field_comments(type(section))
        rows.append(f"[{section_field.name}]")
        for f in dataclasses.fields(section):
            value = json.dumps(getattr(section, f.name))
            note = comments.get(f.name, "")
            rows.append(f"  {section_field.name}.{f.name} = {value}" + (f"  # {note}" if note else ""))
    return "\n".join(rows)


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
    "diff_configs",
    "describe_config",
]
