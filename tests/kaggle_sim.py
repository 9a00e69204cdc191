"""A stand-in for Kaggle sessions: the pushed notebooks executed the way Kaggle executes them.

Each :meth:`KaggleSim.run` is one kernel *version*, set up as Kaggle sets one up:

- the notebook is the one ``jaguar-kit kaggle push`` builds (:func:`prepare_kernel`, the same
  function), and its ``kernel-metadata.json`` decides what is mounted: the competition at
  ``input/competitions/<slug>/``, datasets at ``input/datasets/<owner>/<slug>/``, kernel
  outputs at ``input/notebooks/<owner>/<slug>/`` (the latest version, or one named);
- ``input/`` is made read-only (``chmod -R a-w``) and, because the tests may run as root
  where permission bits do not bind, snapshotted and compared after the run;
- a fresh ``working/`` folder, kept afterwards as the version's output; a fresh local disk
  (``TMPDIR``) and home;
- a fresh Python environment in which jaguar_kit is *not* importable, so the notebook's own
  install cell must pip-install the wheel from the input, into that environment's
  site-packages, as on Kaggle (the image's packages, torch and timm, are the development
  environment's, linked in after that site-packages, minus jaguar_kit and every ``.pth`` hook);
- no network: a ``sitecustomize`` refuses every connection but loopback (the notebook
  kernel's own), as Kaggle's Internet switch does;
- papermill executes it (Kaggle's runner), changing only the ``parameters`` cell.

Environment: no ``JAGUAR_KIT_*`` variable except ``JAGUAR_KIT_INPUT`` and ``JAGUAR_KIT_WORKING``.
Those two remain because the stand-in cannot live at ``/kaggle`` (the tests do not own ``/``
and run side by side); they are the kit's documented relocation of ``/kaggle/input`` and
``/kaggle/working`` and nothing else. ``JAGUAR_KIT_FAULT`` is set only for a version that is
to be killed: it stands for Kaggle ending the session (a timeout) at that exact instant, with
SIGKILL, deterministically. ``KAGGLE_KERNEL_RUN_TYPE=Batch`` is Kaggle's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
USER = "alice"

SITECUSTOMIZE = '''\
"""Kaggle with Internet off: only loopback connections (the notebook kernel's own) get through."""
import socket

def _local(host):
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host in ("", "localhost", "::1", "0.0.0.0") or host.startswith("127.")

_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local(host):
        raise socket.gaierror(socket.EAI_NONAME, "Temporary failure in name resolution (Internet is off)")
    return _getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
_connect = socket.socket.connect

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise OSError(101, "Network is unreachable (Internet is off)")
    return _connect(self, address)

socket.socket.connect = connect
'''


@dataclass
class Version:
    """One executed kernel version."""

    kernel: str
    number: int
    output: Path  # the working folder: what Kaggle keeps as this version's output
    returncode: int
    log: str  # papermill's own output and every cell's stream output, in order
    error: str | None  # "Name: value" of the failing cell, if one failed
    inputs: dict[str, Path] = field(default_factory=dict)  # source -> where it was mounted
    scratch: Path | None = None  # the session's local disk (TMPDIR)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    def files(self) -> set[str]:
        """Every file of the output, relative to it."""
        return {p.relative_to(self.output).as_posix() for p in self.output.rglob("*") if p.is_file()}

    def tail(self, n: int = 3000) -> str:
        return f"[{self.kernel} v{self.number}: exit {self.returncode}, error {self.error!r}]\n" + self.log[-n:]


def _image_packages(farm: Path) -> Path:
    """The "Kaggle image": the dev environment's packages without jaguar_kit, plus no-network."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        name = entry.name
        if name.endswith(".pth") or name.startswith(("jaguar_kit", "__editable__", "_jaguar_kit")):
            continue
        if name in ("sitecustomize.py", "__pycache__"):
            continue
        (farm / name).symlink_to(entry, target_is_directory=entry.is_dir())
    (farm / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return farm


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class KaggleSim:
    """Kernel versions for one user, run one after another in ``root``."""

    def __init__(self, root: Path, wheel_dataset: Path, competition: Path, user: str = USER):
        self.root, self.wheel_dataset, self.competition, self.user = Path(root), wheel_dataset, competition, user
        self.root.mkdir(parents=True, exist_ok=True)
        self.image = _image_packages(self.root / "image-site-packages")
        self.versions: dict[str, list[Version]] = {}

    def latest(self, kernel: str) -> Version | None:
        return (self.versions.get(kernel) or [None])[-1]

    def run(
        self,
        kernel: str,
        parameters: dict[str, Any] | None = None,
        *,
        resume: bool = False,
        sources: dict[str, list[str]] | None = None,
        attach: dict[str, Version] | None = None,
        fault: str | None = None,
        timeout: float = 300,
    ) -> Version:
        """Push ``kernel`` (train, infer, submit) as ``jaguar-kit kaggle push`` would and run it.

        ``resume``/``sources`` are push's own options. ``attach`` picks which version of an
        attached kernel (by kind) is mounted; otherwise the latest is. ``fault`` arms
        ``JAGUAR_KIT_FAULT`` (Kaggle killing the session at that point).
        """
        from jaguar_kit.kaggle.metadata import KINDS, kernel_slug
        from jaguar_kit.kaggle.push import prepare_kernel

        number = len(self.versions.get(kernel, [])) + 1
        session = self.root / f"{kernel}-v{number}"
        folder = prepare_kernel(kernel, self.user, session / "push", kernels_dir=REPO / "kernels", resume=resume,
                                sources=sources)
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        kaggle_in, working, scratch, home = (session / d for d in ("input", "working", "tmp", "home"))
        for d in (kaggle_in, working, scratch, home):
            d.mkdir(parents=True)

        inputs: dict[str, Path] = {}
        for slug in meta["competition_sources"]:
            if slug != "jaguar-re-id":
                raise ValueError(f"the simulator has no competition {slug!r}")
            inputs[slug] = shutil.copytree(self.competition, kaggle_in / "competitions" / slug)
        for ref in meta["dataset_sources"]:
            if ref != f"{self.user}/jaguar-kit-wheel":
                raise ValueError(f"the simulator has no dataset {ref!r}")
            inputs[ref] = shutil.copytree(self.wheel_dataset, kaggle_in / "datasets" / ref)
        by_slug = {kernel_slug(k): k for k in KINDS}
        for ref in meta["kernel_sources"]:
            owner, slug = ref.split("/")[:2]
            kind = by_slug.get(slug) if owner == self.user else None
            version = (attach or {}).get(kind) or (self.latest(kind) if kind else None)
            if version is None:
                continue  # like Kaggle: a source with no output yet mounts nothing
            inputs[ref] = shutil.copytree(version.output, kaggle_in / "notebooks" / owner / slug, symlinks=True)
        if meta.get("model_sources"):
            raise ValueError("the simulator mounts no Kaggle Models")
        _read_only(kaggle_in)
        before = _snapshot(kaggle_in)

        venv = session / "python"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        python = venv / "bin" / "python"
        # The image's packages after the environment's own site-packages, where pip installs the
        # wheel: a plain path line in a .pth (PYTHONPATH would put them first, where ipykernel's
        # path handling breaks OpenCV's loader).
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        (site / "kaggle_image.pth").write_text(f"{self.image}\n")
        jupyter = session / "jupyter"
        (jupyter / "kernels" / "python3").mkdir(parents=True)
        (jupyter / "kernels" / "python3" / "kernel.json").write_text(json.dumps({
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}))
        env = {
            "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(home), "TMPDIR": str(scratch), "LANG": "C.UTF-8",
            "JUPYTER_PATH": str(jupyter), "JUPYTER_DATA_DIR": str(jupyter), "JUPYTER_CONFIG_DIR": str(jupyter),
            "KAGGLE_KERNEL_RUN_TYPE": "Batch",
            "JAGUAR_KIT_INPUT": str(kaggle_in), "JAGUAR_KIT_WORKING": str(working),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1",
        }
        if fault:
            env["JAGUAR_KIT_FAULT"] = fault
        params = session / "parameters.json"  # JSON is YAML: papermill -f reads it
        params.write_text(json.dumps(parameters or {}))
        executed = session / f"{kernel}.executed.ipynb"
        cmd = [str(python), "-m", "papermill", str(folder / meta["code_file"]), str(executed), "-f", str(params),
               "-k", "python3", "--cwd", str(working), "--no-progress-bar"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=working)
        try:
            runner_log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session, kernel included
            runner_log, _ = proc.communicate()
            runner_log += f"\n[simulator] killed after {timeout:.0f} s"
        seconds = time.monotonic() - start
        try:  # papermill leaves no kernel behind, but a killed one may have left children
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log, error = self._read_executed(executed)
        after = _snapshot(kaggle_in)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))[:5]
            raise AssertionError(f"{kernel} v{number} wrote into the read-only input: {changed}")
        version = Version(kernel, number, working, proc.returncode, log + "\n" + runner_log, error, inputs, scratch,
                          seconds)
        self.versions.setdefault(kernel, []).append(version)
        return version

    @staticmethod
    def _read_executed(path: Path) -> tuple[str, str | None]:
        if not path.is_file():
            return "", None
        nb = json.loads(path.read_text())
        parts, error = [], None
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                if out["output_type"] == "stream":
                    parts.append("".join(out["text"]))
                elif out["output_type"] in ("execute_result", "display_data"):
                    parts.append("".join(out.get("data", {}).get("text/plain", "")))
                elif out["output_type"] == "error" and error is None:
                    error = f"{out['ename']}: {out['evalue']}"
                    parts.append(error)
        return "\n".join(parts), error


def build_wheel_dataset(out: Path, user: str = USER) -> Path:
    """The jaguar-kit-wheel dataset folder, built by the repository's build_dataset.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dataset", REPO / "build_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_dataset(out, user)
    return out
