import json

import pytest

from jaguar_kit.config import Config, apply_overrides, config_from_dict, load_config
from jaguar_kit.errors import JaguarKitError


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.lr=0.001", "train.epochs=3", "model.grad_checkpointing=true",
                                     "model.backbone=eva02-l-448", "loss.arcface_scale=64"])
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 3
    assert cfg.model.grad_checkpointing is True and cfg.model.backbone == "eva02-l-448"
    assert isinstance(cfg.loss.arcface_scale, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("trian.lr=1", "unknown section 'trian'"),
        ("train.epochs=three", "train.epochs must be int"),
        ("model.grad_checkpointing=maybe", "model.grad_checkpointing must be bool"),
        ("train.epochs", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(JaguarKitError, match=message):
        apply_overrides(Config(), [override])


def test_file_with_unknown_key_or_wrong_type(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epochs": "many"}}))
    with pytest.raises(JaguarKitError, match=r"bad.json.*train.epochs must be int"):
        load_config(bad)
    bad.write_text(json.dumps({"model": {"backbone": "x", "dropout": 0.1}}))
    with pytest.raises(JaguarKitError, match="unknown key model.dropout"):
        load_config(bad)
    bad.write_text("{not json")
    with pytest.raises(JaguarKitError, match="cannot parse config"):
        load_config(bad)


def test_json_and_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["train.epochs=7", "data.alpha_mode=blank"])
    cfg.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 7\ndata:\n  alpha_mode: blank\n")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_fingerprint_tracks_results_not_logistics():
    base = Config().fingerprint()
    assert apply_overrides(Config(), ["train.resume=never", "train.device=cpu", "data.workers=8"]).fingerprint() == base
    assert apply_overrides(Config(), ["train.lr=0.1"]).fingerprint() != base
    assert config_from_dict({"model": {"embedding_dim": 256}}).fingerprint() != base


def test_enumerations_are_checked_where_the_config_is_parsed_with_one_message():
    with pytest.raises(JaguarKitError, match=r"^--set: embed.tta='flip8': expected one of flip4, hflip, none$"):
        apply_overrides(Config(), ["embed.tta=flip8"])
    with pytest.raises(JaguarKitError, match=r"cfg.yaml: data.alpha_mode='cut': expected one of crop, blank, ignore"):
        config_from_dict({"data": {"alpha_mode": "cut"}}, source="cfg.yaml")
    # the stages give the same message to a Python caller that skips the config
    from jaguar_kit.embed import embed_images

    with pytest.raises(JaguarKitError, match=r"^embed.tta='flip8': expected one of flip4, hflip, none$"):
        embed_images(None, ["a"], ["a.png"], "/nonexistent", "cpu", tta="flip8")


def test_jaguar_kit_config_lists_every_key_with_its_comment(capsys):
    from jaguar_kit import cli
    from jaguar_kit.config import describe_config

    cli.main(["config", "--set", "train.epochs=3"])
    out = capsys.readouterr().out
    assert out.strip() == describe_config(apply_overrides(Config(), ["train.epochs=3"])).strip()
    assert "train.epochs = 3  # raising it on a finished run extends it from last.pt" in out
    for section in ("data", "model", "loss", "train", "embed", "retrieval"):
        for key in getattr(Config(), section).__dataclass_fields__:
            assert f"{section}.{key} = " in out
