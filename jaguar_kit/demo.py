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

# The demo's recipe: the real one, sized for two CPU cores and ten minutes.
DEMO_OVERRIDES = [
    "model.backbone=efficientnet-lite0",
    "model.weights=auto",
    "data.prepared_size=320",
    "data.num_folds=5",
    "data.workers=2",
    "train.device=cpu",
    "train.epochs=12",
    "train.p=8",
    "train.k=4",
    "train.lr=3e-4",
    "train.warmup_epochs=1",
    "train.patience=4",
    "embed.batch_size=32",
    "retrieval.k1=6",  # re-ranking neighbourhoods sized for ~2 images per identity in validation
    "retrieval.k2=3",
]


def demo_config(overrides: list[str] | None = None) -> Config:
    return apply_overrides(Config(), DEMO_OVERRIDES + list(overrides or []))


def run_demo(data: str | Path | None = None, out: str | Path = "demo_out", overrides: list[str] | None = None,
             progress: bool = True, minutes: float = 10.0) -> dict:
    """Run the demo into ``out``; returns the figures written to ``report.json``."""
    from .data.synth import generate_competition
    from .pipeline import embed_split, read_labels, score, similarity, split_images, submit, write_json
    from .train.engine import train

    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(overrides)
    cfg.train.time_budget_h = minutes / 60 * 0.6  # leave time for embedding and the report
    if data is None:
        print("[1/6] generating the synthetic competition folder")
        data = generate_competition(out / "data", identities=30, images_per_identity=10, test_per_identity=3,
                                    size=384, seed=0, progress=progress)
    data = Path(data)
    prepared, cache = out / "prepared", out / "cache"
    labels = read_labels(data / "train.csv")

    print("[2/6] frozen pretrained baseline (backbone's own pooled features)")
    frozen = embed_split(f"frozen:{cfg.model.backbone}", data, "val", cache / "frozen", prepared, cfg,
                         device=cfg.train.device, progress=progress)
    figures = {"frozen": score([frozen], labels, cfg.retrieval)}

    print("[3/6] fine-tuning with the full recipe")
    run = train(cfg, data, out / "run", prepared_root=prepared, progress=progress)

    print("[4/6] embedding the validation split with the fine-tuned model")
    tuned = embed_split(run.best_checkpoint, data, "val", cache / "finetuned", prepared, device=cfg.train.device,
                        progress=progress)
    figures["finetuned"] = score([tuned], labels, cfg.retrieval)

    print("[5/6] test embeddings, re-ranking, submission.csv")
    test = embed_split(run.best_checkpoint, data, "test", cache / "finetuned", prepared, device=cfg.train.device,
                       progress=progress)
    submission = submit([test], data, out / "submission.csv", cfg.retrieval)
    solution = data / "solution.csv"
    if solution.is_file():
        figures["finetuned_test"] = score([test], read_labels(solution), cfg.retrieval)

    print("[6/6] report")
    from .data.prepare import load_prepared, prepare_images
    from .viz import save_retrieval_grid

    names, sim = similarity([tuned], cfg.retrieval)
    _, val_paths, _ = split_images(cfg, data, "val")
    files = prepare_images(val_paths, prepared, cfg.data.alpha_mode, cfg.data.crop_margin, cfg.data.prepared_size,
                           progress=False)  # already prepared: returns the mapping
    grid = save_retrieval_grid(sim, names, lambda n: load_prepared(files[n]), out / "retrieval_grid.png",
                               labels=[labels[n] for n in names])
    report = {
        "data": str(data),
        "backbone": cfg.model.backbone,
        "training": {"status": run.status, "epochs": run.epochs_done, "best_val_map_during_training": run.best_map},
        "seconds": round(time.monotonic() - t0, 1),
    }
    for model_name, by_rerank in figures.items():
        for tag, r in by_rerank.items():
            report[f"{model_name}/{tag}"] = {"map": round(r["map"], 4), "rank1": round(r["rank1"], 4)}
    write_json(out / "report.json", report)
    table = _table(report)
    (out / "report.md").write_text(
        f"# jaguar_kit demo\n\nData: `{data}`  \nBackbone: `{cfg.model.backbone}` "
        f"(frozen vs. fine-tuned, validation fold {cfg.data.fold})  \nRun time: {report['seconds']} s\n\n"
        f"{table}\n\n![training curves](run/curves.png)\n\n![retrieval grid](retrieval_grid.png)\n"
    )
    print("\n" + table + "\n")
    print(f"run folder: {out.resolve()}\n  report: report.md, report.json\n  submission: {submission.name}\n"
          f"  pictures: run/curves.png, {grid.name}\n  checkpoints: run/best.pt, run/last.pt")
    return report


def _table(report: dict) -> str:
    rows = ["| model | re-ranking | identity-balanced mAP | rank-1 |", "|---|---|---|---|"]
    for key, value in report.items():
        if "/" in key:
            model_name, tag = key.split("/")
            label = {"frozen": "frozen baseline (val)", "finetuned": "fine-tuned (val)",
                     "finetuned_test": "fine-tuned (synthetic test)"}[model_name]
            rows.append(f"| {label} | {'yes' if tag == 'reranked' else 'no'} | {value['map']:.4f} | {value['rank1']:.4f} |")
    return "\n".join(rows)
