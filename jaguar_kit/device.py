"""Device and precision choice: fp32 on CPU, fp16 + GradScaler below sm_80 (T4), bf16 from sm_80.

Kaggle's retired P100 (sm_60) still reports ``torch.cuda.is_available() == True`` under the
current image, but its torch has no sm_60 kernels, so the first CUDA op dies with "no kernel
image is available". We refuse such a GPU at start with a message saying what to pick.
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


def cuda_arch_supported(major: int, minor: int, arch_list: list[str]) -> bool:
    """True if this torch build carries kernels for compute capability ``major.minor``.

    Exact ``sm_XY`` cubins work; PTX (``compute_XY``) at or below the device's capability can
    be JIT-compiled for it.
    """
    cap = major * 10 + minor
    if f"sm_{cap}" in arch_list:
        return True
    ptx = [int(m.group(1)) for a in arch_list if (m := re.fullmatch(r"compute_(\d+)", a))]
    return any(p <= cap for p in ptx)


def check_cuda_device(index: int = 0) -> None:
    """Raise a clear error if the GPU at ``index`` cannot run this torch build."""
    major, minor = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if not cuda_arch_supported(major, minor, arch_list):
        name = torch.cuda.get_device_name(index)
        built = ", ".join(a for a in arch_list if a.startswith("sm_")) or "none"
        raise JaguarKitError(
            f"GPU {name} (sm_{major}{minor}) is not supported by torch {torch.__version__} "
            f"(built for {built}); on Kaggle choose the 'GPU T4 x2' accelerator "
            f'(machine_shape "NvidiaTeslaT4") instead of the P100'
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
