"""The demo's wiring and the command line's surface (the real demo run is the README's first command)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY_OVERRIDES
from jaguar_kit import cli
from jaguar_kit.demo import run_demo
from jaguar_kit.submission import validate_submission


def test_demo_writes_report_submission_and_pictures(competition, tmp_path, capsys):
    report = run_demo(data=competition, out=tmp_path / "demo", overrides=[*TINY_OVERRIDES, "train.epochs=1"],
                      progress=False)
    out = tmp_path / "demo"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for model in ("frozen", "finetuned"):
        for tta in ("none", "hflip", "flip4"):
            for tag in ("raw", "reranked"):
                assert 0 <= on_disk[f"{model}/tta-{tta}/{tag}"]["map"] <= 1
    chosen = on_disk["chosen_on_validation"]
    assert f"finetuned-test/tta-{chosen['tta']}/raw" in on_disk  # the synthetic solution is scored too
    validate_submission(out / "submission.csv", pd.read_csv(competition / "test.csv"))
    for picture in ("retrieval_grid.png", "run/curves.png"):
        assert (out / picture).stat().st_size > 1000
    table = (out / "report.md").read_text()
    assert "| frozen baseline | val | flip4 | yes |" in table and "| fine-tuned | val | none | no |" in table
    assert "report.md" in capsys.readouterr().out
    # the own-photos journey: a catalogue, held-out jaguars as new individuals, a page to check
    # frozen and fine-tuned on the catalogue only, each by the global score and with the coat pattern
    own = on_disk["own_photos"]
    for model in ("frozen", "finetuned"):
        assert own[model]["target_false_merge"] == 0.05
        for f in (v for v in own[model].values() if isinstance(v, dict)):
            assert 0 <= f["false_merge"] <= 1 and 0 <= f["top1_known"] <= 1 and 0 <= f["correct_known"] <= 1
    assert own["fine_tuning"]["epochs"] >= 1
    assert (out / "own_photos" / "finetuned" / "report.html").stat().st_size > 1000 and "## Your own photos" in table
    assert "| fine-tuned |" in table.split("## Your own photos")[1]


def test_demo_finishes_with_its_report_however_slow_the_machine(competition, tmp_path):
    # a budget that ends inside the first epoch: the demo still trains one whole epoch and reports it
    report = run_demo(data=competition, out=tmp_path / "demo", overrides=[*TINY_OVERRIDES, "train.epochs=3"],
                      progress=False, minutes=1e-5)
    assert report["training"]["epochs"] == 1 and report["training"]["epochs_planned"] == 3
    assert (tmp_path / "demo" / "run" / "best.pt").is_file()
    assert "Fine-tuning: 1 of 3 epochs" in (tmp_path / "demo" / "report.md").read_text()


def test_ctrl_c_during_the_demo_training_stops_the_demo(competition, tmp_path, monkeypatch):
    from jaguar_kit import files

    files._fault_counts.clear()
    monkeypatch.setenv("JAGUAR_KIT_FAULT", "train-step:1:SIGINT")  # a real Ctrl-C after the first step
    with pytest.raises(KeyboardInterrupt):  # the CLI turns it into "interrupted ..., a rerun resumes", exit 130
        run_demo(data=competition, out=tmp_path / "demo", overrides=[*TINY_OVERRIDES, "train.epochs=3"], progress=False)
    assert (tmp_path / "demo" / "run" / "last.pt").is_file() and not (tmp_path / "demo" / "report.json").exists()


def test_demo_sizes_epochs_to_the_budget():
    from jaguar_kit.demo import sized_epochs

    assert sized_epochs(600, 0.01, 1000, 100, planned=10) == 10  # 31 s an epoch: all ten fit
    assert sized_epochs(600, 0.1, 1000, 100, planned=10) == 1  # 310 s an epoch: one
    assert sized_epochs(1, 1.0, 1000, 100, planned=10) == 1  # never zero


@pytest.mark.parametrize("command", ["synth", "prepare", "train", "embed", "score", "submit", "demo", "kaggle", "config"])
def test_every_stage_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: jaguar-kit " + command in capsys.readouterr().out


def test_cli_stages_chain_on_synthetic_data(competition, tmp_path, capsys):
    """synth -> train -> embed -> score -> submit through the command line, as the README shows."""
    sets = [a for o in [*TINY_OVERRIDES, "train.epochs=1"] for a in ("--set", o)]
    run, emb, sub = tmp_path / "run", tmp_path / "emb", tmp_path / "sub"
    cli.main(["train", "--data", str(competition), "--out", str(run), "--quiet", *sets])
    cli.main(["embed", "--data", str(competition), "--out", str(emb), "--checkpoint", str(run / "best.pt"),
              "--split", "val", "test", "--quiet"])
    cli.main(["score", "--embeddings", str(emb / "embeddings_val.npz"), "--labels", str(competition / "train.csv"),
              "--per-identity", *sets])
    cli.main(["submit", "--data", str(competition), "--out", str(sub), "--embeddings", str(emb / "embeddings_test.npz"),
              str(emb / "embeddings_test.npz"), *sets])  # the same model twice: a (trivial) ensemble
    out = capsys.readouterr().out
    assert "raw       identity-balanced mAP" in out and "kaggle competitions submit" in out
    validate_submission(sub / "submission.csv", pd.read_csv(competition / "test.csv"))
