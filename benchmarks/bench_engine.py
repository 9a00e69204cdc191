"""Per-step overhead of the training engine against a bare forward/backward loop.

Same model, same PK batches (from the same prepared images), same optimiser and schedule.
Fixed costs (start-up, the end-of-epoch checkpoint) are cancelled by timing two run lengths
and taking the difference per step, for both loops. Target: engine overhead under 5%.

    .venv/bin/python benchmarks/bench_engine.py   # -> benchmarks/results/engine.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.config import Config, apply_overrides  # noqa: E402
from jaguar_kit.data.competition import load_competition  # noqa: E402
from jaguar_kit.data.dataset import ImageDataset, build_transform, sample_seed  # noqa: E402
from jaguar_kit.data.prepare import prepare_images  # noqa: E402
from jaguar_kit.data.sampler import PKSampler  # noqa: E402
from jaguar_kit.data.synth import generate_competition  # noqa: E402
from jaguar_kit.losses import ReIDCriterion  # noqa: E402
from jaguar_kit.models import build_model  # noqa: E402
from jaguar_kit.optim import build_optimizer, build_scheduler  # noqa: E402
from jaguar_kit.train.engine import train  # noqa: E402

SHORT, LONG = 4, 16
OVERRIDES = ["model.backbone=efficientnet-lite0", "model.weights=none", "model.img_size=128", "data.prepared_size=192",
             "data.workers=0", "data.fold=-1", "train.device=cpu", "train.epochs=1", "train.p=4", "train.k=4",
             "train.clip_grad=1.0"]


def engine_seconds(data: Path, work: Path, steps: int) -> float:
    cfg = apply_overrides(Config(), OVERRIDES + [f"train.steps_per_epoch={steps}", "train.resume=never"])
    t = time.perf_counter()
    train(cfg, data, work / f"engine{steps}", prepared_root=work / "prepared", progress=False, resume_roots=[])
    return time.perf_counter() - t


def bare_seconds(data: Path, work: Path, steps: int) -> float:
    """The loop a user would write by hand: no checkpoints, logging, RNG capture or checks."""
    cfg = apply_overrides(Config(), OVERRIDES + [f"train.steps_per_epoch={steps}"])
    t = time.perf_counter()
    comp = load_competition(data)
    prepared = prepare_images(list(comp.train["path"]), work / "prepared", size=192, workers=0, progress=False)
    classes = sorted(set(comp.train["identity"]))
    labels = np.array([classes.index(i) for i in comp.train["identity"]])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    criterion = ReIDCriterion(cfg.loss, cfg.model.embedding_dim, len(classes))
    opt = build_optimizer(model, criterion, cfg.train)
    sched = build_scheduler(opt, steps, 1)
    ds = ImageDataset([str(prepared[n]) for n in comp.train["filename"]], labels,
                      build_transform((128, 128), model.data_config["mean"], model.data_config["std"], train=True))
    model.train()
    sampler = PKSampler(labels, cfg.train.p, cfg.train.k, seed=cfg.train.seed, steps_per_epoch=steps)
    for b, batch in enumerate(sampler.batches(0)):
        items = [ds[(i, sample_seed(cfg.train.seed, 0, b, j))] for j, i in enumerate(batch)]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([it[1] for it in items])
        loss, _ = criterion(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(criterion.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return time.perf_counter() - t


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = generate_competition(work / "data", identities=8, images_per_identity=8, size=256, progress=False)
        bare_seconds(data, work, 2)  # warm-up: prepare the cache, load libraries
        runs = {"engine": [], "bare": []}
        for _ in range(5):  # interleaved repeats; the median resists the shared machine's noise
            for name, fn in (("engine", engine_seconds), ("bare", bare_seconds)):
                short, long = fn(data, work, SHORT), fn(data, work, LONG)
                runs[name].append((long - short) / (LONG - SHORT))
        engine, bare = float(np.median(runs["engine"])), float(np.median(runs["bare"]))
    result = {
        "what": "seconds per training step (efficientnet-lite0, 128 px, PK 4x4, CPU), fixed costs cancelled",
        "engine_s_per_step_median": round(engine, 4),
        "bare_loop_s_per_step_median": round(bare, 4),
        "overhead": round(engine / bare - 1, 4),
        "target_overhead": 0.05,
        "all_runs": {k: [round(v, 4) for v in vs] for k, vs in runs.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = REPO / "benchmarks" / "results" / "engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
