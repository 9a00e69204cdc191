"""Kaggle kernel and dataset metadata: our three kernels' metadata, and validators.

The validators apply the Kaggle CLI's own rules (``kaggle kernels push`` /
``kaggle datasets create``) plus ours, so a mistake fails here with every problem listed
instead of on Kaggle, or worse, not at all: Kaggle accepts a push with an invalid source
and runs the kernel without that input. Each validator returns one-line problems; the
``check_*`` variants raise them as one :class:`JaguarKitError`.

:func:`kernel_metadata` is the single source of truth for the train, infer and submit
kernels: ``jaguar-kit kaggle push`` renders each kernel's file at push time with the user's
name and any extra sources; the one file kept in the repository (the root
``kernel-metadata.json``) is rendered from it too (:func:`repo_metadata`) and a test keeps
it equal to the generator's output.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import JaguarKitError


@dataclass(frozen=True)
class KernelKind:
    """One of our kernels: its Kaggle title (its slug derives from it), the kernels whose output
    it attaches, and whether it must get a GPU."""

    title: str
    upstream: tuple[str, ...]
    gpu: bool


# The one table of our kernels, read by the metadata, push and the Kaggle session simulator.
KERNELS = {
    "train": KernelKind("Jaguar Re-ID Train", (), gpu=True),
    "infer": KernelKind("Jaguar Re-ID Infer", ("train",), gpu=True),  # checkpoints
    "submit": KernelKind("Jaguar Re-ID Submit", ("infer", "train"), gpu=True),  # embeddings; may train a pseudo round
}
KINDS = tuple(KERNELS)
COMPETITION = "jaguar-re-id"
WHEEL_DATASET_SLUG = "jaguar-kit-wheel"
WHEEL_DATASET_TITLE = "Jaguar Kit Wheel"
# Stands for the user's Kaggle name in the files kept in the repository. It has valid
# syntax, so the validators refuse it by name unless told it is expected.
PLACEHOLDER_USER = "your-kaggle-username"
GPU_SHAPE = "NvidiaTeslaT4"  # T4 x2; the P100 is retired (no sm_60 kernels in the image's torch)
RETIRED_SHAPES = ("NvidiaTeslaP100",)
# What `jaguar-kit kaggle push --dataset/--model/--kernel/--competition` adds, by metadata field.
SOURCE_KINDS = {"datasets": "dataset_sources", "models": "model_sources", "kernels": "kernel_sources",
                "competitions": "competition_sources"}

KERNEL_FIELDS = {
    "id", "id_no", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu",
    "enable_tpu", "enable_internet", "machine_shape", "dataset_sources", "competition_sources",
    "kernel_sources", "model_sources", "keywords", "docker_image_pinning_type", "docker_image",
}
BOOL_FIELDS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")

# The Kaggle CLI's slug rules (lowercase words joined by single hyphens); owners may use "_".
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_OWNER = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")
_VERSION = re.compile(r"^[0-9]+$")


def slugify(text: str) -> str:
    """Kaggle's slug of a title (python-slugify's defaults, which the CLI uses).

    Written out because python-slugify is a dependency of the kaggle CLI, not of our
    wheel; a test checks it against python-slugify where that is installed.
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())  # 1,000 -> 1000
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def kernel_slug(kind: str) -> str:
    """The id slug of one of our kernels, e.g. ``jaguar-re-id-train``."""
    return slugify(KERNELS[_check_kind(kind)].title)


def _check_kind(kind: str) -> str:
    if kind not in KERNELS:
        raise JaguarKitError(f"kernel {kind!r}: expected one of {', '.join(KERNELS)}")
    return kind


def kernel_metadata(
    kind: str,
    user: str,
    *,
    kernel_type: str = "notebook",
    code_file: str | None = None,
    internet: bool = True,
    gpu: bool | None = None,
    private: bool = True,
    resume: bool = False,
    extra_kernel_sources: tuple[str, ...] = (),
    sources: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The ``kernel-metadata.json`` of our train, infer or submit kernel for ``user``.

    Every boolean is explicit (the CLI silently defaults ``enable_internet`` to true). The
    title, the attached upstream kernels and ``gpu`` (when not given) come from :data:`KERNELS`.
    ``code_file`` defaults to ``<kind>.ipynb`` for a notebook
    (built next to this file by :func:`jaguar_kit.kaggle.push.push_kernel`) and
    ``<kind>.py`` for a script. ``resume`` attaches this kernel's own previous output (a
    timed-out training continues from its ``last.pt``, inference from its cached chunks);
    ``extra_kernel_sources`` adds other kernels, e.g. more trained models. ``sources`` adds
    inputs by kind (:data:`SOURCE_KINDS`: ``datasets``, ``models``, ``kernels``,
    ``competitions``), e.g. ``{"models": ["bvra/megadescriptor-l-384/pytorch/default/1"]}``
    for weights that must load with Internet off.
    """
    entry = KERNELS[_check_kind(kind)]
    gpu = entry.gpu if gpu is None else gpu
    if code_file is None:
        code_file = f"{kind}.ipynb" if kernel_type == "notebook" else f"{kind}.py"
    own = f"{user}/{kernel_slug(kind)}"
    kernels = [f"{user}/{kernel_slug(k)}" for k in entry.upstream] + ([own] if resume else [])
    kernels += [s for s in extra_kernel_sources if s not in kernels]
    meta: dict[str, Any] = {
        "id": own,
        "title": entry.title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": kernel_type,
        "is_private": private,
        "enable_gpu": gpu,
        "enable_tpu": False,
        "enable_internet": internet,
        "dataset_sources": [f"{user}/{WHEEL_DATASET_SLUG}"],
        "competition_sources": [COMPETITION],
        "kernel_sources": kernels,
        "model_sources": [],
    }
    if gpu:
        meta["machine_shape"] = GPU_SHAPE
    return add_sources(meta, sources)


def add_sources(meta: dict[str, Any], sources: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """``meta`` with more inputs by kind (:data:`SOURCE_KINDS`), each listed once."""
    meta = dict(meta)
    for kind, refs in (sources or {}).items():
        if kind not in SOURCE_KINDS:
            raise JaguarKitError(f"sources: unknown kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
        key = SOURCE_KINDS[kind]
        have = list(meta.get(key) or [])
        meta[key] = have + [r for r in refs if r not in have]
    return meta


def repo_metadata(user: str = PLACEHOLDER_USER) -> dict[str, dict[str, Any]]:
    """The metadata files kept in the repository, keyed by their path from the repo root.

    Only ``kernel-metadata.json``: it pushes ``kernels/train.py`` as a script from the
    repository root (``jaguar-kit kaggle push . --user ME`` puts the user's name in). The
    notebooks' metadata is rendered at push time into the build folder, never kept.
    """
    return {"kernel-metadata.json": kernel_metadata("train", user, kernel_type="script",
                                                    code_file="kernels/train.py")}


def render_metadata(meta: dict[str, Any]) -> str:
    """The exact text a metadata file is written with (stable, so it can be diffed)."""
    return json.dumps(meta, indent=2) + "\n"


def write_repo_metadata(repo_root: str | Path) -> list[Path]:
    """(Re)write the repository's metadata files from :func:`repo_metadata`."""
    from ..files import atomic_write_text  # files needs numpy: this module stays standard-library only

    written = []
    for rel, meta in repo_metadata().items():
        path = Path(repo_root) / rel
        atomic_write_text(path, render_metadata(meta))
        written.append(path)
    return written


# ---------------------------------------------------------------- validators


def _parse_bool(value: Any) -> bool | None:
    """The CLI's boolean rule: a JSON bool or the string "true"/"false" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _owner_problem(field: str, ref: str, owner: str, allow_placeholder: bool) -> str | None:
    if not _OWNER.match(owner):
        return f"{field} {ref!r}: owner {owner!r} must be a Kaggle user name (lowercase letters, digits, - or _)"
    if owner == PLACEHOLDER_USER and not allow_placeholder:
        return (f"{field} {ref!r}: replace the placeholder {PLACEHOLDER_USER!r} with your Kaggle "
                "user name (pass --user/--owner or set KAGGLE_USERNAME)")
    return None


def _ref_problem(field: str, ref: Any, form: str, allow_placeholder: bool) -> str | None:
    """Check one source reference against its form; ``None`` when it is valid."""
    if not isinstance(ref, str) or not ref:
        return f"{field}: {ref!r} is not a non-empty string"
    parts = ref.split("/")
    if form == "slug":  # competition_sources
        if len(parts) != 1 or not _SLUG.match(ref):
            return f"{field} {ref!r}: expected a competition slug like {COMPETITION!r}"
        return None
    if form == "model":  # the CLI requires the version: owner/model/framework/variation/version
        if len(parts) != 5 or not all(parts) or not _VERSION.match(parts[4]):
            return f"{field} {ref!r}: expected 'owner/model/framework/variation/version' (version a number)"
        return _owner_problem(field, ref, parts[0], allow_placeholder)
    # "owner/slug", optionally "/version" (the CLI accepts a pinned version)
    if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not _VERSION.match(parts[2])):
        return f"{field} {ref!r}: expected 'owner/slug' (optionally '/VERSION')"
    if not _SLUG.match(parts[1]):
        return f"{field} {ref!r}: slug {parts[1]!r} must be lowercase letters, digits and single hyphens"
    if form == "kernel" and len(parts[1]) < 5:
        return f"{field} {ref!r}: a kernel slug has at least 5 characters"
    return _owner_problem(field, ref, parts[0], allow_placeholder)


def validate_kernel_metadata(
    meta: dict[str, Any],
    folder: str | Path,
    *,
    expect_gpu: bool = False,
    allow_placeholder: bool = False,
) -> list[str]:
    """Every problem with a ``kernel-metadata.json`` in ``folder``, one line each.

    The CLI's rules plus ours: ``language`` python, ``enable_internet`` explicit, known
    field names (a misspelt field is silently ignored by Kaggle), GPU kernels on
    ``NvidiaTeslaT4``, and a notebook's ``.ipynb`` carrying a kernelspec (else Kaggle's run
    fails with "No kernel name found in notebook"). ``expect_gpu`` also requires
    ``enable_gpu`` true.
    """
    if not isinstance(meta, dict):
        return [f"metadata must be a JSON object, got {type(meta).__name__}"]
    problems: list[str] = []
    for key in sorted(set(meta) - KERNEL_FIELDS):
        problems.append(f"unknown field {key!r} (Kaggle ignores it; known: {', '.join(sorted(KERNEL_FIELDS))})")

    # id: user/slug, no version
    kid = meta.get("id")
    if not isinstance(kid, str) or not kid:
        problems.append("id: missing; expected 'user/slug'")
        slug = None
    else:
        parts = kid.split("/")
        slug = parts[1] if len(parts) >= 2 else None
        if len(parts) == 3:
            problems.append(f"id {kid!r}: must not contain a version; use 'user/slug'")
        elif len(parts) != 2 or not all(parts):
            problems.append(f"id {kid!r}: expected 'user/slug'")
        else:
            p = _ref_problem("id", kid, "kernel", allow_placeholder)
            if p:
                problems.append(p)

    # title: >= 5 characters, slugifies to the id's slug
    title = meta.get("title")
    if not isinstance(title, str) or len(title) < 5:
        problems.append(f"title {title!r}: must be a string of at least 5 characters")
    elif slug and slugify(title) != slug.lower():
        problems.append(
            f"title {title!r}: its slug {slugify(title)!r} differs from the id's slug {slug!r} "
            "(Kaggle would name the kernel after the title)"
        )

    language = meta.get("language")
    if language != "python":
        problems.append(f"language {language!r}: must be 'python'")
    kernel_type = meta.get("kernel_type")
    if kernel_type not in ("script", "notebook"):
        problems.append(f"kernel_type {kernel_type!r}: must be 'script' or 'notebook'")

    # booleans
    flags: dict[str, bool | None] = {}
    for key in BOOL_FIELDS:
        if key in meta:
            flags[key] = _parse_bool(meta[key])
            if flags[key] is None:
                problems.append(f"{key} {meta[key]!r}: must be true/false (a JSON bool or the string)")
    if "enable_internet" not in meta:
        problems.append("enable_internet: missing; set it explicitly (the Kaggle CLI defaults it to true)")

    # sources
    forms = {"dataset_sources": "dataset", "competition_sources": "slug",
             "kernel_sources": "kernel", "model_sources": "model"}
    for key, form in forms.items():
        refs = meta.get(key, [])
        if not isinstance(refs, list):
            problems.append(f"{key}: must be a list, got {type(refs).__name__}")
            continue
        for ref in refs:
            p = _ref_problem(key, ref, form, allow_placeholder)
            if p:
                problems.append(p)

    # accelerator
    gpu, tpu = flags.get("enable_gpu"), flags.get("enable_tpu")
    shape = meta.get("machine_shape")
    if expect_gpu and gpu is not True:
        problems.append("enable_gpu: must be true for this kernel (it trains or embeds on the GPU)")
    if gpu and tpu:
        problems.append("enable_gpu and enable_tpu: at most one accelerator")
    if gpu:
        if shape is None:
            problems.append(f"machine_shape: missing for a GPU kernel; set {GPU_SHAPE!r} (T4 x2)")
        elif shape in RETIRED_SHAPES:
            problems.append(f"machine_shape {shape!r}: retired (the image's torch has no kernels for it); use {GPU_SHAPE!r}")
        elif shape != GPU_SHAPE:
            problems.append(f"machine_shape {shape!r}: our GPU kernels run on {GPU_SHAPE!r}")
    elif isinstance(shape, str) and shape.startswith("Nvidia"):
        problems.append(f"machine_shape {shape!r}: needs enable_gpu true")

    # code_file: relative, inside the folder, exists; a notebook's carries a kernelspec
    code = meta.get("code_file")
    if not isinstance(code, str) or not code:
        problems.append("code_file: missing; name the kernel's source file, relative to this folder")
    elif Path(code).is_absolute() or ".." in Path(code).parts:
        problems.append(f"code_file {code!r}: must be a path relative to {folder} and inside it")
    else:
        path = Path(folder) / code
        if not path.is_file():
            problems.append(f"code_file {code!r}: {path} not found")
        elif kernel_type == "notebook":
            if path.suffix != ".ipynb":
                problems.append(f"code_file {code!r}: a notebook kernel pushes an .ipynb (build it from the .py)")
            else:
                problems.extend(_notebook_problems(path, code))
        elif kernel_type == "script" and path.suffix != ".py":
            problems.append(f"code_file {code!r}: a python script kernel pushes a .py file")
    return problems


def _notebook_problems(path: Path, code: str) -> list[str]:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"code_file {code!r}: not a readable notebook ({str(e).splitlines()[0]})"]
    spec = nb.get("metadata", {}).get("kernelspec") if isinstance(nb, dict) else None
    if not isinstance(spec, dict) or not spec.get("name"):
        return [f"code_file {code!r}: notebook has no kernelspec (Kaggle fails with "
                "'No kernel name found in notebook'); add one to the .py's jupytext header"]
    return []


def validate_dataset_metadata(meta: dict[str, Any], *, allow_placeholder: bool = False) -> list[str]:
    """Every problem with a ``dataset-metadata.json`` (the CLI's rules for a new dataset)."""
    if not isinstance(meta, dict):
        return [f"metadata must be a JSON object, got {type(meta).__name__}"]
    problems: list[str] = []
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title {title!r}: must be 6 to 50 characters")
    did = meta.get("id")
    parts = did.split("/") if isinstance(did, str) else []
    if len(parts) != 2 or not all(parts):
        problems.append(f"id {did!r}: expected 'owner/slug'")
    else:
        owner, slug = parts
        if not 6 <= len(slug) <= 50:
            problems.append(f"id {did!r}: the slug must be 6 to 50 characters")
        elif not _SLUG.match(slug):
            problems.append(f"id {did!r}: slug {slug!r} must be lowercase letters, digits and single hyphens")
        p = _owner_problem("id", did, owner, allow_placeholder)
        if p:
            problems.append(p)
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1:
        n = len(licenses) if isinstance(licenses, list) else "no list of"
        problems.append(f"licenses: exactly one license required, got {n}")
    elif not isinstance(licenses[0], dict) or not isinstance(licenses[0].get("name"), str) or not licenses[0]["name"]:
        problems.append(f"licenses {licenses!r}: expected [{{\"name\": \"CC0-1.0\"}}]")
    return problems


def _raise(problems: list[str], where: str) -> None:
    if problems:
        raise JaguarKitError(f"{where}: " + "; ".join(problems))


def check_kernel_metadata(meta: dict[str, Any], folder: str | Path, **kwargs: Any) -> None:
    """Raise one :class:`JaguarKitError` listing every problem of a kernel's metadata."""
    _raise(validate_kernel_metadata(meta, folder, **kwargs), str(Path(folder) / "kernel-metadata.json"))


def check_dataset_metadata(meta: dict[str, Any], where: str | Path = "dataset-metadata.json", **kwargs: Any) -> None:
    """Raise one :class:`JaguarKitError` listing every problem of a dataset's metadata."""
    _raise(validate_dataset_metadata(meta, **kwargs), str(where))


def dataset_metadata(owner: str, license_name: str = "CC0-1.0") -> dict[str, Any]:
    """The ``dataset-metadata.json`` of the wheel dataset that the kernels attach."""
    return {
        "title": WHEEL_DATASET_TITLE,
        "id": f"{owner}/{WHEEL_DATASET_SLUG}",
        "licenses": [{"name": license_name}],
    }


__all__ = [
    "KernelKind",
    "KERNELS",
    "KINDS",
    "COMPETITION",
    "WHEEL_DATASET_SLUG",
    "PLACEHOLDER_USER",
    "SOURCE_KINDS",
    "GPU_SHAPE",
    "slugify",
    "kernel_slug",
    "kernel_metadata",
    "add_sources",
    "dataset_metadata",
    "repo_metadata",
    "render_metadata",
    "write_repo_metadata",
    "validate_kernel_metadata",
    "validate_dataset_metadata",
    "check_kernel_metadata",
    "check_dataset_metadata",
]
