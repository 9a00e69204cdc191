"""``jaguar-kit demo``: the whole pipeline on a CPU, on data the kit generates itself.

Synthetic competition -> prepared images -> frozen pretrained baseline -> fine-tuning with
the full recipe (GeM, 512-d head, ArcFace + batch-hard triplet, PK batches, layer-wise LR
decay) -> TTA embeddings -> re-ranking -> a table, a report, a submission and pictures.
Everything runs through the same library calls as the Kaggle kernels.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import Config, apply_overrides
from .models.backbones import frozen_source

# The demo's recipe: the real one, sized for two CPU cores and ten minutes.
DEMO_OVERRIDES = [
    "model.backbone=efficientnet-lite0",
    "model.weights=auto",
    "data.prepared_size=320",
    "data.num_folds=5",
    "data.workers=0",  # on two cores, loader processes only compete with the training threads
    "train.device=cpu",
    "train.epochs=10",
    "train.p=8",
    "train.k=4",
    "train.lr=1e-3",
    "train.warmup_epochs=1",
    "train.head_epochs=1",  # a short run: one epoch of head warm-up, then the backbone joins
    "train.patience=4",
    "embed.batch_size=32",
    "retrieval.k1=6",  # re-ranking neighbourhoods sized for ~2 images per identity in validation
    "retrieval.k2=3",
]


def demo_config(overrides: list[str] | None = None) -> Config:
    return apply_overrides(Config(), DEMO_OVERRIDES + list(overrides or []))


def run_demo(data: str | Path | None = None, out: str | Path = "demo_out", overrides: list[str] | None = None,
             progress: bool = True, minutes: float = 12.0) -> dict:
    """Run the demo into ``out``; returns the figures written to ``report.json``.

    Test-time augmentation and re-ranking are measured on the validation split, not assumed:
    the submission uses whichever of (no TTA, four flips) x (raw, re-ranked) scored best
    there (jaguar flanks differ left to right, so flips can hurt).
    """
    import copy

    from .data.prepare import load_prepared, prepare_images
    from .data.synth import generate_competition
    from .pipeline import embed_split, read_labels, score, similarity, split_images, submit, write_json
    from .train.engine import train
    from .viz import save_retrieval_grid

    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(overrides)
    cfg.train.time_budget_h = minutes / 60 * 0.6  # leave time for embedding and the report
    if data is None:
        print("[1/7] generating the synthetic competition folder")
        # 16 views per jaguar: with 10 (8 to train on, about 4 per flank) fine-tuning memorises the
        # training views (train mAP 0.64, validation 0.15). The real competition has 13 to 183
        # images per jaguar (mean 61); each synthetic image is exactly as hard as before.
        data = generate_competition(out / "data", identities=30, images_per_identity=16, test_per_identity=3,
                                    size=384, seed=0, progress=progress)
    data = Path(data)
    prepared, cache = out / "prepared", out / "cache"
    labels = read_labels(data / "train.csv")

    def embed(source: str | Path, split: str, tta: str):
        c = copy.deepcopy(cfg)
        c.embed.tta = tta
        return embed_split(source, data, split, cache, prepared, c, device=cfg.train.device, progress=progress)

    figures: dict[str, dict] = {}
    print("[2/7] frozen pretrained baseline (the backbone's own pooled features)")
    seconds = {}
    for tta in TTA_CHOICES:  # the first call also prepares the images; the others only embed
        t = time.monotonic()
        figures[f"frozen/tta-{tta}"] = score([embed(frozen_source(cfg.model.backbone), "val", tta)], labels, cfg.retrieval)
        seconds[tta] = time.monotonic() - t
    n_train, n_val = len(split_images(cfg, data, "train")[0]), len(split_images(cfg, data, "val")[0])
    timed = TTA_CHOICES[1:]
    views = sum({"none": 1, "hflip": 2, "flip4": 4}[t] for t in timed) * n_val
    forward_s = sum(seconds[t] for t in timed) / max(views, 1)  # one image through the backbone, measured here
    budget_s = cfg.train.time_budget_h * 3600 - (time.monotonic() - t0)
    planned = cfg.train.epochs
    cfg.train.epochs = sized_epochs(budget_s, forward_s, n_train - n_val, n_val, planned)

    print(f"[3/7] fine-tuning with the full recipe ({cfg.train.epochs} of {planned} epochs fit the time budget)")
    run = train(cfg, data, out / "run", prepared_root=prepared, progress=progress)
    if run.stop_reason.startswith("SIG"):  # Ctrl-C or SIGTERM: stop here; a rerun resumes the training
        raise KeyboardInterrupt
    if run.epochs_done == 0:  # slower than measured: finish one epoch whatever it takes, for a model to report
        print("    the time budget ended inside the first epoch; finishing that epoch")
        cfg.train.time_budget_h, cfg.train.epochs = 1e6, 1
        run = train(cfg, data, out / "run", prepared_root=prepared, progress=progress)

    print("[4/7] the fine-tuned model on the validation split")
    tuned = {tta: embed(run.best_checkpoint, "val", tta) for tta in TTA_CHOICES}
    for tta, emb in tuned.items():
        figures[f"finetuned/tta-{tta}"] = score([emb], labels, cfg.retrieval)
    best_tta, best_rerank = max(((t, r) for t in TTA_CHOICES for r in ("raw", "reranked")),
                                key=lambda tr: figures[f"finetuned/tta-{tr[0]}"][tr[1]]["map"])
    chosen = copy.deepcopy(cfg.retrieval)
    chosen.rerank = best_rerank == "reranked"
    print(f"    chosen on validation: TTA {best_tta}, {'with' if chosen.rerank else 'without'} re-ranking")

    print("[5/7] test embeddings and submission.csv")
    test = embed(run.best_checkpoint, "test", best_tta)
    submission = submit([test], data, out / "submission.csv", chosen)
    solution = data / "solution.csv"
    if solution.is_file():
        figures[f"finetuned-test/tta-{best_tta}"] = score([test], read_labels(solution), cfg.retrieval)

    print("[6/7] report")
    names, sim = similarity([tuned[best_tta]], chosen)
    val_names, val_paths, _ = split_images(cfg, data, "val")
    files = prepare_images(val_paths, prepared, cfg.data.alpha_mode, cfg.data.crop_margin, cfg.data.prepared_size,
                           progress=False)  # already prepared: returns the mapping
    path_of = dict(zip(val_names, map(str, val_paths)))
    grid = save_retrieval_grid(sim, names, lambda n: load_prepared(files[path_of[n]]), out / "retrieval_grid.png",
                               labels=[labels[n] for n in names])

    print("[7/7] your own photos: a catalogue of some jaguars, the others held out as new individuals")
    own = own_photos_step(data, out / "own_photos", cfg, prepared, t0 + minutes * 60, progress)
    report = {
        "data": str(data),
        "backbone": cfg.model.backbone,
        "training": {"status": run.status, "epochs": run.epochs_done, "epochs_planned": planned,
                     "best_val_map_during_training": run.best_map, "frozen_val_map_epoch_0": run.frozen_map},
        "chosen_on_validation": {"tta": best_tta, "rerank": chosen.rerank},
        "own_photos": own,
        "seconds": round(time.monotonic() - t0, 1),
    }
    for key, by_rerank in figures.items():
        for tag, r in by_rerank.items():
            report[f"{key}/{tag}"] = {"map": round(r["map"], 4), "rank1": round(r["rank1"], 4)}
    write_json(out / "report.json", report)
    table = _table(report)
    own_text = _own_photos_table(own)
    (out / "report.md").write_text(
        f"# jaguar_kit demo\n\nData: `{data}`  \nBackbone: `{cfg.model.backbone}` "
        f"(frozen vs. fine-tuned, validation fold {cfg.data.fold})  \nRun time: {report['seconds']} s  \n"
        f"Fine-tuning: {run.epochs_done} of {planned} epochs in the time budget ({run.status})  \n"
        f"Chosen on validation for the submission: TTA `{best_tta}`, re-ranking {chosen.rerank}\n\n"
        f"{table}\n\n![training curves](run/curves.png)\n\n![retrieval grid](retrieval_grid.png)\n\n"
        f"## Your own photos\n\n{own_text}\n\nThe page to check by eye (fine-tuned + coat pattern): "
        f"[own_photos/finetuned/report.html](own_photos/finetuned/report.html)\n"
    )
    print("\n" + table + "\n\n" + own_text + "\n")
    print(f"run folder: {out.resolve()}\n  report: report.md, report.json\n  submission: {submission.name}\n"
          f"  pictures: run/curves.png, {grid.name}\n  checkpoints: run/best.pt, run/last.pt\n"
          f"  own photos: own_photos/finetuned/report.html, own_photos/finetuned/identify.csv")
    return report


TTA_CHOICES = ("none", "hflip", "flip4")
OWN_FIGURES = ("top1_known", "top5_known", "auroc_known_vs_new", "correct_known", "false_merge", "false_split",
               "identify_photos_per_s")


def own_photos_step(data: Path, out: Path, cfg: Config, prepared: Path, deadline: float, progress: bool,
                    seed: int = 0, train_seconds: float = 150.0) -> dict:
    """The ecologist's journey on the demo's jaguars: 30% of them (drawn by ``seed``) held out as new individuals, a
    catalogue of half the photos of the others; a model fine-tuned on the catalogue alone (it never
    sees the new ones); identification with the frozen and the fine-tuned model, each by the global
    score alone and with coat-pattern evidence. The fine-tuning stops after ``train_seconds`` (and
    before ``deadline``, the demo's end, less two minutes to identify), at least one minute.
    Returns the figures of the four, by model."""
    import copy

    from .photos.evaluate import catalogue_demo, open_set_split
    from .photos.inputs import read_photos
    from .photos.training import photos_as_competition
    from .train.engine import train

    photos = read_photos(data, need_identity=True)
    cat_rows, _, new_rows = open_set_split([p.identity for p in photos], 0.3, 0.5, seed=seed)
    new = sorted({photos[i].identity for i in new_rows})
    c = copy.deepcopy(cfg)
    c.train.epochs = min(OWN_EPOCHS, cfg.train.epochs)
    c.data.fold = -1  # a catalogue is small: every photo trains, for a few epochs (no validation split to spare)
    c.train.time_budget_h = max(60.0, min(train_seconds, deadline - time.monotonic() - 120)) / 3600
    print(f"    fine-tuning on the {len(cat_rows)} catalogue photos ({c.train.epochs} epochs at most)")
    with photos_as_competition([photos[i] for i in cat_rows], out / "run", progress=progress) as folder:
        run = train(c, folder, out / "run", prepared_root=prepared, progress=progress)
    if run.stop_reason.startswith("SIG"):
        raise KeyboardInterrupt
    figures = {}
    for name, source in (("frozen", frozen_source(cfg.model.backbone)), ("finetuned", run.best_checkpoint)):
        f = catalogue_demo(data, source, out / name, seed=seed, prepared_size=cfg.data.prepared_size,
                           progress=progress, new_individuals=new, coat="on")
        figures[name] = {evidence: {k: round(v, 4) for k, v in by.items() if k in OWN_FIGURES}
                         for evidence, by in f["by_evidence"].items()}
        figures[name]["target_false_merge"] = f["target_false_merge"]
    figures["fine_tuning"] = {"epochs": run.epochs_done, "status": run.status}
    return figures


OWN_EPOCHS = 6


def _own_photos_table(own: dict) -> str:
    rows = ["| model | evidence | top-1 known | top-5 known | AUROC known vs new | known decided correctly | "
            "false merges (target) | known called new | photos/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("frozen", "finetuned"):
        for evidence, f in own[name].items():
            if isinstance(f, dict):
                rows.append(f"| {MODEL_LABELS[name]} | {evidence} | {f['top1_known']:.3f} | {f['top5_known']:.3f} | "
                            f"{f['auroc_known_vs_new']:.3f} | {f['correct_known']:.1%} | {f['false_merge']:.1%} "
                            f"({own[name]['target_false_merge']:.0%}) | {f['false_split']:.1%} | "
                            f"{f['identify_photos_per_s']:.1f} |")
    return ("Some jaguars held out as new individuals; the fine-tuned model was trained on the catalogue's photos "
            "only:\n\n" + "\n".join(rows))


def sized_epochs(budget_s: float, forward_s: float, n_train: int, n_val: int, planned: int) -> int:
    """How many epochs fit ``budget_s``: at least one (a model to report), at most ``planned``.

    A training image costs about three forward passes (forward plus a backward twice as
    long); validation one per image. ``forward_s`` is measured on this machine.
    """
    epoch_s = forward_s * (3 * n_train + n_val)
    return int(max(1, min(planned, budget_s // max(epoch_s, 1e-9))))
MODEL_LABELS = {"frozen": "frozen baseline", "finetuned": "fine-tuned", "finetuned-test": "fine-tuned, synthetic test"}


def _table(report: dict) -> str:
    rows = ["| model | split | TTA | re-ranking | identity-balanced mAP | rank-1 |", "|---|---|---|---|---|---|"]
    for key, value in report.items():
        if key.count("/") == 2:
            model_name, tta, tag = key.split("/")
            split = "test" if model_name.endswith("-test") else "val"
            rows.append(f"| {MODEL_LABELS[model_name]} | {split} | {tta[4:]} | {'yes' if tag == 'reranked' else 'no'} "
                        f"| {value['map']:.4f} | {value['rank1']:.4f} |")
    return "\n".join(rows)
