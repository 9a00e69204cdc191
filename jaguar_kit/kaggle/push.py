"""Build a kernel's notebook and push it with ``kaggle kernels push``.

A kernel lives in the repository as a jupytext percent-format ``.py`` (readable diffs);
Kaggle gets the ``.ipynb`` built from it, next to its ``kernel-metadata.json``, in a build
folder. Everything is validated before the CLI runs, and the CLI's output is checked
afterwards: Kaggle accepts a push whose sources are invalid and then runs the kernel
without them, which would only show hours later as a missing input.

Command line (``jaguar-kit kaggle push`` takes the same arguments)::

    python -m jaguar_kit.kaggle.push train [--user ME] [--resume] [--dry-run]
        [--dataset OWNER/SLUG] [--model OWNER/MODEL/FRAMEWORK/VARIATION/VERSION]
        [--kernel OWNER/SLUG] [--competition SLUG]
    python -m jaguar_kit.kaggle.push PATH/WITH/kernel-metadata.json-folder --user ME
    python -m jaguar_kit.kaggle.push --write-metadata .   # re-render the repo's metadata

The user name comes from ``--user``, else ``$KAGGLE_USERNAME``, else the ``username`` of the
kaggle CLI's ``kaggle.json`` (``$KAGGLE_CONFIG_DIR``, ``~/.kaggle`` or ``~/.config/kaggle``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import JaguarKitError
from ..files import atomic_write_text
from .metadata import (
    KERNELS,
    PLACEHOLDER_USER,
    SOURCE_KINDS,
    add_sources,
    check_kernel_metadata,
    kernel_metadata,
    render_metadata,
    write_repo_metadata,
)

METADATA_FILE = "kernel-metadata.json"
_INVALID_SOURCES = re.compile(r"The following are not valid .*sources.*", re.IGNORECASE)
_PUSH_ERROR = re.compile(r"Kernel push error.*", re.IGNORECASE)


def build_notebook(py_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a jupytext percent-format ``.py`` into ``out_dir/<name>.ipynb``.

    Refuses a source whose jupytext header has no ``kernelspec``: jupytext then writes a
    notebook without one, and Kaggle's run fails with "No kernel name found in notebook".
    """
    import jupytext  # a development tool, not needed by the wheel on Kaggle

    py_path = Path(py_path)
    if not py_path.is_file():
        raise JaguarKitError(f"{py_path}: kernel source not found")
    try:
        nb = jupytext.read(py_path, fmt="py:percent")
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise JaguarKitError(f"{py_path}: cannot read as a jupytext percent script: {str(e).splitlines()[0]}") from e
    spec = nb.metadata.get("kernelspec") or {}
    if not spec.get("name"):
        raise JaguarKitError(
            f"{py_path}: its jupytext header has no kernelspec, so Kaggle would fail with 'No kernel "
            "name found in notebook'; add `kernelspec: {name: python3, display_name: Python 3, "
            "language: python}` under `jupyter:` in the header"
        )
    out = Path(out_dir) / f"{py_path.stem}.ipynb"
    atomic_write_text(out, jupytext.writes(nb, fmt="ipynb"))
    return out


def kaggle_config_files() -> list[Path]:
    """Where the kaggle CLI looks for ``kaggle.json``, in its order."""
    env = os.environ.get("KAGGLE_CONFIG_DIR")
    if env:
        return [Path(env).expanduser() / "kaggle.json"]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.home() / ".kaggle" / "kaggle.json", xdg / "kaggle" / "kaggle.json"]


def kaggle_user(user: str | None = None) -> str:
    """The Kaggle user name: ``user``, else ``$KAGGLE_USERNAME``, else ``kaggle.json``'s."""
    if user:
        return user
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    for path in kaggle_config_files():
        if not path.is_file():
            continue
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("username")
        except (OSError, ValueError, AttributeError) as e:
            raise JaguarKitError(f"{path}: not a readable kaggle.json ({e})") from e
        if isinstance(name, str) and name:
            return name
        raise JaguarKitError(f"{path}: has no \"username\"; pass --user or set KAGGLE_USERNAME")
    raise JaguarKitError(
        "no Kaggle user name: pass --user ME, set KAGGLE_USERNAME, or put the kaggle.json from "
        f"kaggle.com/settings (API) at {kaggle_config_files()[0]}"
    )


def _with_user(meta: dict[str, Any], user: str) -> dict[str, Any]:
    """Put ``user`` in place of the id's owner (or the placeholder) in the id and sources."""
    meta = dict(meta)
    old = {PLACEHOLDER_USER}
    if isinstance(meta.get("id"), str) and "/" in meta["id"]:
        old.add(meta["id"].split("/", 1)[0])

    def swap(ref: Any) -> Any:
        if isinstance(ref, str) and "/" in ref and ref.split("/", 1)[0] in old:
            return user + "/" + ref.split("/", 1)[1]
        return ref

    meta["id"] = swap(meta.get("id"))
    for key in ("dataset_sources", "kernel_sources", "model_sources"):
        if isinstance(meta.get(key), list):
            meta[key] = [swap(r) for r in meta[key]]
    return meta


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise JaguarKitError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise JaguarKitError(f"{path}: expected a JSON object")
    return meta


def prepare_kernel(
    kernel: str | Path,
    user: str | None = None,
    build_dir: str | Path = Path("build/kaggle"),
    *,
    kernels_dir: str | Path | None = None,
    resume: bool = False,
    sources: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Build the folder ``kaggle kernels push -p`` takes: code file + validated metadata.

    ``kernel`` is one of ``train``, ``infer``, ``submit`` (source ``kernels_dir/<kind>.py``,
    default ``./kernels``; metadata from :func:`kernel_metadata`), or a folder holding a
    ``kernel-metadata.json`` whose ``code_file`` is converted (a notebook's ``.py``) or
    copied. ``user`` (default: :func:`kaggle_user`) replaces the owner in the id and sources.
    ``resume`` attaches the kernel's own previous output (one of our kinds only).
    ``sources`` attaches more inputs by kind (``datasets``, ``models``, ``kernels``,
    ``competitions``). Returns ``build_dir/<kind or slug>``.
    """
    build_dir = Path(build_dir)
    if str(kernel) in KERNELS:
        kind = str(kernel)
        src_dir = Path(kernels_dir) if kernels_dir is not None else Path.cwd() / "kernels"
        py = src_dir / f"{kind}.py"
        if not py.is_file():
            raise JaguarKitError(f"{py}: kernel source not found; run from the repository root or pass kernels_dir")
        meta = kernel_metadata(kind, kaggle_user(user), resume=resume, sources=sources)
        out = build_dir / kind
        meta["code_file"] = build_notebook(py, out).name
        expect_gpu = KERNELS[kind].gpu
    else:
        folder = Path(kernel)
        if resume:
            raise JaguarKitError(f"{kernel}: resume applies to train, infer or submit; for a folder, "
                                 "add the kernel's own id to kernel_sources in its metadata")
        if not (folder / METADATA_FILE).is_file():
            raise JaguarKitError(
                f"{kernel}: neither one of {', '.join(KERNELS)} nor a folder with {METADATA_FILE}"
            )
        meta = _read_metadata(folder)
        owner = str(meta.get("id", "")).split("/", 1)[0]
        if user or owner in ("", PLACEHOLDER_USER):
            meta = _with_user(meta, kaggle_user(user))
        meta = add_sources(meta, sources)
        code = meta.get("code_file")
        src = folder / code if isinstance(code, str) and code else None
        if src is None or not src.is_file():
            check_kernel_metadata(meta, folder)  # reports the missing code_file with the rest
            raise JaguarKitError(f"{folder / METADATA_FILE}: code_file {code!r} not found")
        slug = str(meta.get("id", "kernel")).split("/")[-1] or "kernel"
        out = build_dir / slug
        if meta.get("kernel_type") == "notebook" and src.suffix == ".py":
            meta["code_file"] = build_notebook(src, out).name
        else:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / src.name)
            meta["code_file"] = src.name
        expect_gpu = False
    check_kernel_metadata(meta, out, expect_gpu=expect_gpu)
    atomic_write_text(out / METADATA_FILE, render_metadata(meta))
    return out


def _kaggle_executable() -> str:
    exe = shutil.which("kaggle")
    if exe is None:
        raise JaguarKitError(
            "kaggle: command not found; `pip install kaggle`, then put kaggle.json in ~/.kaggle "
            "(or set KAGGLE_API_TOKEN)"
        )
    return exe


def check_push_output(output: str, folder: str | Path) -> None:
    """Raise on what ``kaggle kernels push`` reports while still exiting 0."""
    for pattern, what in ((_INVALID_SOURCES, "pushed, but Kaggle dropped sources, so the kernel runs "
                           "without them (check each name exists and is yours or public)"),
                          (_PUSH_ERROR, "push failed")):
        m = pattern.search(output)
        if m:
            raise JaguarKitError(f"{folder}: {what}: {m.group(0).strip()}")


def push_kernel(
    kernel: str | Path,
    user: str | None = None,
    build_dir: str | Path = Path("build/kaggle"),
    dry_run: bool = False,
    *,
    kernels_dir: str | Path | None = None,
    resume: bool = False,
    sources: Mapping[str, Sequence[str]] | None = None,
    timeout_s: float = 600,
) -> list[str]:
    """Build, validate and push one kernel; returns the ``kaggle kernels push`` command.

    See :func:`prepare_kernel` for ``kernel``, ``user``, ``kernels_dir``, ``resume`` and
    ``sources``. With ``dry_run`` the command is printed and returned without running.
    """
    out = prepare_kernel(kernel, user, build_dir, kernels_dir=kernels_dir, resume=resume, sources=sources)
    cmd = ["kaggle", "kernels", "push", "-p", str(out)]
    print(("would run: " if dry_run else "running: ") + shlex.join(cmd))
    if dry_run:
        return cmd
    exe = _kaggle_executable()
    try:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise JaguarKitError(f"{out}: kaggle kernels push did not finish within {timeout_s:.0f} s") from e
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    output = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "no output")
        raise JaguarKitError(f"{out}: kaggle kernels push failed (exit {proc.returncode}): {last}")
    check_push_output(output, out)
    return cmd


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dataset/--model/--kernel/--competition`` options (each repeatable)."""
    add = parser.add_argument
    add("--dataset", dest="source_datasets", action="append", default=[], metavar="OWNER/SLUG",
        help="attach a dataset, e.g. a copy of the backbone's weights (repeatable)")
    add("--model", dest="source_models", action="append", default=[],
        metavar="OWNER/MODEL/FRAMEWORK/VARIATION/VERSION",
        help="attach a Kaggle Model, e.g. the backbone's weights for Internet off (repeatable)")
    add("--kernel", dest="source_kernels", action="append", default=[], metavar="OWNER/SLUG",
        help="attach a kernel's output: another trained model, a previous session (repeatable)")
    add("--competition", dest="source_competitions", action="append", default=[], metavar="SLUG",
        help="attach another competition (repeatable)")


def sources_from_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """``{"datasets": [...], ...}`` from the options of :func:`add_source_arguments`."""
    out = {kind: list(getattr(args, f"source_{kind}", None) or []) for kind in SOURCE_KINDS}
    return {k: v for k, v in out.items() if v}


def push_from_args(args: argparse.Namespace) -> list[str]:
    """Run a push from parsed arguments (``jaguar-kit kaggle push`` and this module's ``main``)."""
    build = getattr(args, "build_dir", None) or getattr(args, "build", None) or "build/kaggle"
    return push_kernel(args.kernel, args.user, Path(build), args.dry_run,
                       kernels_dir=getattr(args, "kernels_dir", None), resume=args.resume,
                       sources=sources_from_args(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaguar_kit.kaggle.push", description=__doc__.split("\n")[0])
    parser.add_argument("kernel", nargs="?", help="train | infer | submit | a folder with kernel-metadata.json")
    parser.add_argument("--user", help="Kaggle user name (default: $KAGGLE_USERNAME, then kaggle.json)")
    parser.add_argument("--build-dir", default="build/kaggle", help="where the pushed folders are built")
    parser.add_argument("--kernels-dir", help="folder of the kernels' .py sources (default ./kernels)")
    parser.add_argument("--resume", action="store_true", help="attach the kernel's own previous output")
    parser.add_argument("--dry-run", action="store_true", help="build and validate, print the command only")
    add_source_arguments(parser)
    parser.add_argument("--write-metadata", metavar="REPO", help="re-render the repo's metadata files and exit")
    args = parser.parse_args(argv)
    try:
        if args.write_metadata:
            for path in write_repo_metadata(args.write_metadata):
                print(f"wrote {path}")
            return 0
        if not args.kernel:
            parser.error("name a kernel (train, infer, submit or a folder)")
        push_from_args(args)
    except JaguarKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "build_notebook",
    "kaggle_user",
    "prepare_kernel",
    "push_kernel",
    "push_from_args",
    "add_source_arguments",
    "sources_from_args",
    "check_push_output",
    "main",
]
