"""Build the jaguar_kit wheel into a folder ready to upload as a Kaggle dataset.

The kernels install the wheel offline (``pip install --no-index --no-deps``), so it must
be pure (``py3-none-any``) and hold only the package. The wheel is built from a clean
copy of the sources, so stale ``build/`` files or tests can never slip into it, and is
put at the folder's top level: ``kaggle datasets version`` skips sub-folders.

    python build_dataset.py [--owner ME] [--out dist/kaggle-dataset]
    kaggle datasets create -p dist/kaggle-dataset            # the first time
    kaggle datasets version -p dist/kaggle-dataset -m "..."  # afterwards
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaguar_kit.errors import JaguarKitError
from jaguar_kit.files import atomic_write_bytes, atomic_write_text
from jaguar_kit.kaggle.metadata import check_dataset_metadata, dataset_metadata, render_metadata
from jaguar_kit.kaggle.push import kaggle_user

REPO = Path(__file__).resolve().parent
PACKAGE = "jaguar_kit"
# What a wheel build reads besides the package; anything else (tests, kernels) stays out.
BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "LICENSE.txt")


def check_wheel(wheel: Path) -> None:
    """Refuse a wheel Kaggle's offline install could not use: not pure, or not only our package."""
    if not wheel.name.endswith("-py3-none-any.whl"):
        raise JaguarKitError(f"{wheel}: not a pure py3-none-any wheel; Kaggle's image needs one")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    version = wheel.name.split("-")[1]
    allowed = (f"{PACKAGE}/", f"{PACKAGE}-{version}.dist-info/")
    stray = [n for n in names if not n.startswith(allowed)]
    if stray:
        raise JaguarKitError(f"{wheel}: holds files outside {PACKAGE}/: {', '.join(stray[:5])}")
    if f"{PACKAGE}/__init__.py" not in names:
        raise JaguarKitError(f"{wheel}: has no {PACKAGE}/__init__.py")


def build_wheel(source_dir: Path, work_dir: Path, python: str = sys.executable) -> Path:
    """Build the wheel from a clean copy of ``source_dir`` inside ``work_dir``; return its path.

    ``pip wheel --no-build-isolation`` uses the setuptools already installed, so the build
    works offline (an isolated build would download setuptools).
    """
    stage = work_dir / "src"
    shutil.copytree(source_dir / PACKAGE, stage / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, stage / name)
    dist = work_dir / "dist"
    cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", "--quiet", "--wheel-dir", str(dist), str(stage)]
    env = dict(os.environ, TMPDIR=str(work_dir), PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wheels = sorted(dist.glob(f"{PACKAGE}-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise JaguarKitError(f"{source_dir}: wheel build failed: {out[-1] if out else 'no wheel produced'}")
    return wheels[0]


def build_dataset(
    out_dir: str | Path,
    owner: str,
    *,
    source_dir: str | Path = REPO,
    license_name: str = "CC0-1.0",
) -> Path:
    """Build the wheel into ``out_dir`` (top level) with its ``dataset-metadata.json``.

    Returns the wheel's path. Older ``jaguar_kit-*.whl`` in ``out_dir`` are removed so a
    dataset version holds exactly one wheel.
    """
    out_dir = Path(out_dir)
    meta = dataset_metadata(owner, license_name)
    check_dataset_metadata(meta, out_dir / "dataset-metadata.json")  # before the slow part
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".jaguar-kit-build-", dir=out_dir.parent) as tmp:
        built = build_wheel(Path(source_dir), Path(tmp))
        check_wheel(built)
        wheel = out_dir / built.name
        atomic_write_bytes(wheel, built.read_bytes())
    for old in out_dir.glob(f"{PACKAGE}-*.whl"):
        if old != wheel:
            old.unlink()
    atomic_write_text(out_dir / "dataset-metadata.json", render_metadata(meta))
    return wheel


def upload_commands(out_dir: str | Path, version: str) -> dict[str, list[str]]:
    """The kaggle commands that upload the folder: ``create`` once, ``version`` after."""
    return {
        "create": ["kaggle", "datasets", "create", "-p", str(out_dir)],
        "version": ["kaggle", "datasets", "version", "-p", str(out_dir), "-m", f"jaguar_kit {version}"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the jaguar_kit wheel into a Kaggle dataset folder.")
    parser.add_argument("--out", default="dist/kaggle-dataset", help="dataset folder (default: %(default)s)")
    parser.add_argument("--owner", help="your Kaggle user name (default: $KAGGLE_USERNAME, then kaggle.json's)")
    parser.add_argument("--license", default="CC0-1.0", help="the dataset's one license (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        wheel = build_dataset(args.out, kaggle_user(args.owner), license_name=args.license)
    except JaguarKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmds = upload_commands(args.out, wheel.name.split("-")[1])
    print(f"built {wheel}")
    print(f"first upload:  {shlex.join(cmds['create'])}")
    print(f"new version:   {shlex.join(cmds['version'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
