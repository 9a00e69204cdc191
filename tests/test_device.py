import pytest
import torch

from jaguar_kit import device
from jaguar_kit.errors import JaguarKitError

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def test_arch_support_rules():
    assert device.cuda_arch_supported(7, 5, ARCHS)  # T4
    assert not device.cuda_arch_supported(6, 0, ARCHS)  # P100 under Kaggle's current image
    assert device.cuda_arch_supported(6, 0, ["sm_50", "compute_50"])  # PTX JIT from below works
    assert not device.cuda_arch_supported(6, 0, ["sm_75", "compute_75"])


def _fake_gpu(monkeypatch, cap, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ARCHS)


def test_p100_is_refused_with_what_to_pick(monkeypatch):
    _fake_gpu(monkeypatch, (6, 0), "Tesla P100-PCIE-16GB")
    with pytest.raises(JaguarKitError, match=r"P100.*sm_60.*not supported.*T4"):
        device.select_device("auto")


def test_precision_follows_the_device(monkeypatch):
    assert device.select_device("cpu").amp_dtype is None
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    t4 = device.select_device("auto")
    assert t4.amp_dtype == torch.float16 and t4.use_grad_scaler
    _fake_gpu(monkeypatch, (8, 0), "A100")
    a100 = device.select_device("auto")
    assert a100.amp_dtype == torch.bfloat16 and not a100.use_grad_scaler
