"""One pseudo-label round: calibrated selection, ensemble agreement, a derived folder, one round only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jaguar_kit.data.competition import load_competition
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.pseudo import (PSEUDO_MARKER, ROUND_RUN, IdentityModel, fit_temperature, publish_round,
                               pseudo_label_round, read_round_status, round_finished, select_pseudo_labels,
                               write_pseudo_competition)


def test_fitted_temperature_recovers_the_true_scale():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.2, 0.9, size=(4000, 6))
    z = 12.0 * cos
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    truth = np.array([rng.choice(6, p=row) for row in p])
    assert fit_temperature(cos, truth) == pytest.approx(12.0, rel=0.1)


def _clusters(rng, n_ids=5, per=6, dim=8, noise=0.3):
    centers = rng.normal(size=(n_ids, dim))
    labels = np.repeat([f"id{i}" for i in range(n_ids)], per)
    return centers, labels, centers[np.repeat(np.arange(n_ids), per)] + noise * rng.normal(size=(n_ids * per, dim))


def test_selection_needs_every_model_to_agree_above_the_threshold():
    rng = np.random.default_rng(1)
    centers, labels, gallery = _clusters(rng)
    _, val_labels, val = _clusters(np.random.default_rng(2))
    val = centers[[int(v[2:]) for v in val_labels]] + 0.3 * rng.normal(size=(len(val_labels), 8))
    model = IdentityModel.fit(gallery, labels, val, val_labels)
    # t3 lies exactly between two identities: at most 0.5 for either
    test = np.stack([centers[0], centers[1], centers[2], model.centroids[3] + model.centroids[4]])
    names = ["t0.png", "t1.png", "t2.png", "t3.png"]
    one = select_pseudo_labels([model], [test], names, threshold=0.9)
    assert list(one["filename"]) == ["t0.png", "t1.png", "t2.png"]  # the ambiguous one is left out
    assert list(one["ground_truth"]) == ["id0", "id1", "id2"] and (one["probability"] >= 0.9).all()
    # A second model that sees t1 as another identity: t1 is dropped (every model must agree).
    other = test.copy()
    other[1] = centers[2]
    both = select_pseudo_labels([model, model], [test, other], names, threshold=0.9)
    assert list(both["filename"]) == ["t0.png", "t2.png"]
    # Probabilities are calibrated on validation: held-out images at >= 0.9 are right >= ~90% of the time.
    _, hold_labels, _ = _clusters(np.random.default_rng(3), per=40)
    hold = centers[[int(v[2:]) for v in hold_labels]] + 0.3 * np.random.default_rng(4).normal(size=(200, 8))
    p = model.probabilities(hold)
    sure = p.max(1) >= 0.9
    correct = np.array(model.classes)[p.argmax(1)] == hold_labels
    assert correct[sure].mean() >= 0.88


def test_derived_folder_adds_pseudo_images_and_leaves_out_validation(competition, tmp_path):
    comp = load_competition(competition)
    tests = list(comp.test_images["filename"])[:3]
    ident = comp.train["identity"].iloc[0]
    pseudo = pd.DataFrame({"filename": tests, "ground_truth": [ident] * 3, "probability": [0.95] * 3})
    exclude = list(comp.train["filename"])[:4]
    out = write_pseudo_competition(competition, pseudo, tmp_path / "d", exclude)
    derived = load_competition(out)  # a valid competition folder, images readable
    assert set(derived.train["filename"]) == (set(comp.train["filename"]) - set(exclude)) | set(tests)
    assert (derived.train.set_index("filename").loc[tests, "identity"] == ident).all()
    bad = pseudo.assign(ground_truth="Nobody")
    with pytest.raises(JaguarKitError, match="Nobody"):
        write_pseudo_competition(competition, bad, tmp_path / "e")


@pytest.mark.slow
def test_one_round_trains_from_the_checkpoint_and_refuses_a_second(competition, tiny_config, tmp_path, monkeypatch):
    from jaguar_kit.train.checkpoint import load_checkpoint
    from jaguar_kit.train.engine import train

    first = train(tiny_config, competition, tmp_path / "run", progress=False, resume_roots=[])
    # as on Kaggle, where the training output is attached: its folder is also named run, and the round
    # must not take it for its own earlier session (it would be refused as another config)
    monkeypatch.setenv("JAGUAR_KIT_INPUT", str(tmp_path))
    comp = load_competition(competition)
    tests = list(comp.test_images["filename"])[:4]
    ids = list(comp.train["identity"].iloc[:4])
    pseudo = pd.DataFrame({"filename": tests, "ground_truth": ids, "probability": [0.97] * 4})
    result = pseudo_label_round(first.best_checkpoint, competition, pseudo, tmp_path / "round", epochs=1,
                                progress=False)
    assert result.best_checkpoint.is_file()
    cfg = load_checkpoint(result.best_checkpoint)["config"]
    assert cfg["model"]["init_from"] == str(first.best_checkpoint.resolve())
    assert cfg["data"]["fold"] == -1 and cfg["train"]["epochs"] == 1
    derived = pd.read_csv(tmp_path / "round" / "data" / "train.csv")
    from jaguar_kit.pipeline import split_images

    val_names = split_images(tiny_config, competition, "val")[0]
    assert set(tests) <= set(derived["filename"]) and not set(val_names) & set(derived["filename"])
    assert (tmp_path / "round" / ROUND_RUN / PSEUDO_MARKER).is_file()
    assert read_round_status(tmp_path / "round")["status"] == "finished" and round_finished(tmp_path / "round")
    with pytest.raises(JaguarKitError, match="only one round"):
        pseudo_label_round(result.best_checkpoint, competition, pseudo, tmp_path / "round2", epochs=1,
                           progress=False)


@pytest.mark.slow
def test_a_killed_round_is_not_finished_and_resumes_from_its_attached_folder(competition, tiny_config, tmp_path,
                                                                             capsys):
    import shutil

    from jaguar_kit.train.checkpoint import load_checkpoint
    from jaguar_kit.train.engine import train

    first = train(tiny_config, competition, tmp_path / "run", progress=False, resume_roots=[])
    comp = load_competition(competition)
    pseudo = pd.DataFrame({"filename": list(comp.test_images["filename"])[:4],
                           "ground_truth": list(comp.train["identity"].iloc[:4]), "probability": [0.97] * 4})
    # the session ends after the first optimiser step (a clean stop stands for Kaggle's kill here)
    cut = pseudo_label_round(first.best_checkpoint, competition, pseudo, tmp_path / "s1" / "model0", epochs=2,
                             overrides=["train.time_budget_h=1e-9"], progress=False)
    assert cut.status == "interrupted"
    status = read_round_status(tmp_path / "s1" / "model0")
    assert status["status"] == "started" and status["epochs"] == 2 and status["epochs_done"] == 0
    assert not round_finished(tmp_path / "s1" / "model0")  # its best.pt, if any, is not the round's model
    # the next session sees it read-only among its inputs, and the training checkpoint at another path
    attached = tmp_path / "input" / "submit" / "pseudo" / "model0"
    shutil.copytree(tmp_path / "s1" / "model0", attached)
    moved = tmp_path / "input" / "train" / "run" / "best.pt"
    moved.parent.mkdir(parents=True)
    shutil.copyfile(first.best_checkpoint, moved)
    done = pseudo_label_round(moved, competition, pseudo, tmp_path / "s2" / "model0", epochs=2, progress=False,
                              resume_from=attached)
    assert done.status == "finished" and done.epochs_done == 2
    assert f"resuming the run attached at {attached / ROUND_RUN}" in capsys.readouterr().out  # not restarted
    assert load_checkpoint(tmp_path / "s2" / "model0" / ROUND_RUN / "last.pt")["global_step"] == 8
    assert read_round_status(tmp_path / "s2" / "model0")["status"] == "finished"
    # republished file by file: never the run's lock, temporaries or the derived image links
    (tmp_path / "s2" / "model0" / ROUND_RUN / ".lock").write_text("1")
    publish_round(tmp_path / "s2" / "model0", tmp_path / "s3" / "model0")
    files = {p.relative_to(tmp_path / "s3").as_posix() for p in (tmp_path / "s3").rglob("*") if p.is_file()}
    assert {f"model0/{ROUND_RUN}/best.pt", f"model0/{ROUND_RUN}/{PSEUDO_MARKER}", "model0/round_status.json",
            "model0/pseudo_labels.csv"} <= files
    assert not any(f.endswith(".lock") or "/data/" in f for f in files), sorted(files)
    assert round_finished(tmp_path / "s3" / "model0")
