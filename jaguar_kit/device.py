"""Device and precision choice: fp32 on CPU, fp16 + GradScaler below sm_80 (T4), bf16 from sm_80.

A GPU the installed torch has no kernels for still reports ``torch.cuda.is_available() ==
True`` (Kaggle's retired P100, sm_60, under the current image), and the first CUDA op dies
with "no kernel image is available". We refuse such a GPU at start, by CUDA's compatibility
rules, with a message naming the GPU and saying what to pick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import JaguarKitError


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    use_grad_scaler: bool
    description: str


def _capability(arch: str) -> tuple[str, int, int, str] | None:
    """``sm_86`` -> ("sm", 8, 6, ""); ``compute_120`` -> ("compute", 12, 0, ""); ``sm_90a`` -> (.., "a")."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch.strip())
    return (m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)) if m else None


def cuda_arch_supported(major: int, minor: int, arch_list: list[str]) -> bool:
    """True if a torch built for ``arch_list`` runs on a GPU of compute capability ``major.minor``.

    CUDA's rules: a cubin ``sm_XY`` runs on ``sm_XZ`` with Z >= Y (same major: a build for
    sm_86 runs on sm_89); an arch-specific cubin (``sm_90a``) only on its own capability; PTX
    ``compute_XY`` is JIT-compiled for any capability >= XY.
    """
    for arch in arch_list:
        cap = _capability(arch)
        if cap is None:
            continue
        kind, a_major, a_minor, suffix = cap
        if kind == "compute":
            if (major, minor) >= (a_major, a_minor):
                return True
        elif suffix == "a":
            if (major, minor) == (a_major, a_minor):
                return True
        elif major == a_major and minor >= a_minor:
            return True
    return False


def check_cuda_device(index: int = 0) -> None:
    """Raise a clear error if the GPU at ``index`` cannot run this torch build."""
    major, minor = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if cuda_arch_supported(major, minor, arch_list):
        return
    from .kaggle.env import is_kaggle

    name = torch.cuda.get_device_name(index)
    built = ", ".join(arch_list) or "no CUDA architecture"
    caps = sorted({(c[1], c[2]) for a in arch_list if (c := _capability(a))})
    oldest = f"sm_{caps[0][0]}{caps[0][1]}" if caps else "a newer one"
    if is_kaggle():
        pick = ("in the notebook's settings choose the accelerator 'GPU T4 x2' "
                '(kernel-metadata.json machine_shape "NvidiaTeslaT4")')
    else:
        pick = (f"use a GPU of compute capability {oldest} or newer, install a torch built for "
                f"sm_{major}{minor}, or set train.device=cpu")
    raise JaguarKitError(
        f"GPU {name} (compute capability {major}.{minor}, sm_{major}{minor}) cannot run torch "
        f"{torch.__version__}, which is built for {built}: {pick}"
    )


def select_device(preference: str = "auto", index: int = 0) -> DeviceInfo:
    """Pick the device and its training precision.

    ``preference`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``/``cuda:N``.
    """
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return DeviceInfo(torch.device("cpu"), None, False, "cpu (fp32)")
    if not torch.cuda.is_available():
        raise JaguarKitError(f"train.device={preference!r} but no CUDA GPU is visible")
    if preference.startswith("cuda:"):
        index = int(preference.split(":", 1)[1])
    check_cuda_device(index)
    major, _ = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if major >= 8:
        return DeviceInfo(torch.device("cuda", index), torch.bfloat16, False, f"{name} (bf16 autocast)")
    # T4 reports bf16 "supported" through emulation, but it is slow and cuDNN has no bf16 convs
    # below sm_80: fp16 with a GradScaler is the right choice there.
    return DeviceInfo(torch.device("cuda", index), torch.float16, True, f"{name} (fp16 autocast + GradScaler)")
