import pytest
import torch

from jaguar_kit import device
from jaguar_kit.errors import JaguarKitError

# The style of Kaggle's current image (torch 2.10, CUDA 12.8): no sm_60, PTX only for the newest.
KAGGLE_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
# An older build that still carried Pascal.
PASCAL_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]


@pytest.mark.parametrize(
    "capability, arch_list, runs",
    [
        ((6, 0), KAGGLE_ARCHS, False),  # P100 on today's Kaggle image
        ((6, 1), KAGGLE_ARCHS, False),  # P40 / GTX 10xx
        ((7, 0), KAGGLE_ARCHS, False),  # V100: sm_75 cubins do not run on 7.0 (minor below)
        ((7, 5), KAGGLE_ARCHS, True),  # T4
        ((8, 0), KAGGLE_ARCHS, True),  # A100
        ((8, 6), KAGGLE_ARCHS, True),  # A10, RTX 30xx
        ((8, 9), KAGGLE_ARCHS, True),  # L4, RTX 40xx: sm_86 cubin, same major, higher minor
        ((9, 0), KAGGLE_ARCHS, True),  # H100
        ((10, 0), KAGGLE_ARCHS, True),  # B200
        ((12, 0), KAGGLE_ARCHS, True),  # RTX 50xx
        ((13, 0), KAGGLE_ARCHS, True),  # a future GPU: PTX compute_120 JIT-compiles
        ((6, 0), PASCAL_ARCHS, True),
        ((8, 9), PASCAL_ARCHS, True),
        ((10, 0), PASCAL_ARCHS, True),  # PTX compute_90 covers 10.0
        ((8, 9), ["sm_80", "sm_90"], True),  # sm_80 cubin runs on 8.9
        ((8, 9), ["sm_90", "compute_90"], False),  # PTX runs only on newer GPUs, 8.9 < 9.0
        ((9, 0), ["sm_90a"], True),  # arch-specific cubins run on their own capability...
        ((10, 0), ["sm_90a"], False),  # ...and nowhere else
        ((9, 0), ["sm_80", "sm_86"], False),  # other major, no PTX
        ((7, 5), [], False),
    ],
)
def test_capability_table(capability, arch_list, runs):
    assert device.cuda_arch_supported(*capability, arch_list) is runs


def _fake_gpu(monkeypatch, cap, name, archs=KAGGLE_ARCHS):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)


@pytest.fixture
def on_kaggle(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")


@pytest.fixture
def off_kaggle(monkeypatch, tmp_path):
    from jaguar_kit.kaggle import env

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", tmp_path / "no-kaggle")


def test_p100_on_kaggle_is_refused_with_what_to_pick(monkeypatch, on_kaggle):
    _fake_gpu(monkeypatch, (6, 0), "Tesla P100-PCIE-16GB")
    with pytest.raises(JaguarKitError) as e:
        device.select_device("auto")
    msg = str(e.value)
    assert "Tesla P100-PCIE-16GB" in msg and "sm_60" in msg and "sm_75, sm_80" in msg
    assert "GPU T4 x2" in msg and "NvidiaTeslaT4" in msg and "\n" not in msg


def test_refusal_names_the_gpu_it_is_and_never_a_p100_it_is_not(monkeypatch, off_kaggle):
    _fake_gpu(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB")
    with pytest.raises(JaguarKitError) as e:
        device.select_device("cuda")
    msg = str(e.value)
    assert "Tesla V100-SXM2-16GB" in msg and "sm_70" in msg and "P100" not in msg
    assert "sm_75 or newer" in msg and "train.device=cpu" in msg


def test_l4_runs_on_a_build_for_sm_86(monkeypatch):
    _fake_gpu(monkeypatch, (8, 9), "NVIDIA L4", archs=["sm_75", "sm_80", "sm_86", "sm_90"])
    info = device.select_device("auto")
    assert info.device.type == "cuda" and info.amp_dtype == torch.bfloat16


def test_precision_follows_the_device(monkeypatch):
    assert device.select_device("cpu").amp_dtype is None
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    t4 = device.select_device("auto")
    assert t4.amp_dtype == torch.float16 and t4.use_grad_scaler
    _fake_gpu(monkeypatch, (8, 0), "A100")
    a100 = device.select_device("auto")
    assert a100.amp_dtype == torch.bfloat16 and not a100.use_grad_scaler
