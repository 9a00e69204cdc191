"""Peak GPU memory and images/s of one training step of a full-size backbone (needs CUDA).

Does ``megadescriptor-l-384`` (Swin-L, 384 px) train at batch 16 in fp16 on a 16 GB T4?
Random weights are fine for memory and speed. Measures the real engine pieces (model,
ArcFace + triplet criterion, LLRD AdamW, GradScaler) with gradient checkpointing off and on.

    .venv/bin/python benchmarks/bench_gpu_step.py [--backbone NAME] [--batch 16]
    # -> benchmarks/results/gpu_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.config import Config, apply_overrides  # noqa: E402
from jaguar_kit.losses import ReIDCriterion  # noqa: E402
from jaguar_kit.models import build_model  # noqa: E402
from jaguar_kit.optim import build_optimizer  # noqa: E402

T4_BYTES = 15 * 1024**3  # usable memory of a 16 GB T4


def measure(backbone: str, batch: int, checkpointing: bool, steps: int = 8) -> dict:
    cfg = apply_overrides(Config(), [f"model.backbone={backbone}", "model.weights=none",
                                     f"model.grad_checkpointing={checkpointing}"])
    device = torch.device("cuda")
    model = build_model(cfg.model).to(device).train()
    criterion = ReIDCriterion(cfg.loss, cfg.model.embedding_dim, 31).to(device)  # 31 jaguars
    optimizer = build_optimizer(model, criterion, cfg.train)
    scaler = torch.amp.GradScaler("cuda")
    size = model.data_config["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.arange(batch, device=device) % 4  # PK-like: 4 identities x batch/4 images
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _ = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    peak = torch.cuda.max_memory_allocated()
    del model, criterion, optimizer
    torch.cuda.empty_cache()
    return {"grad_checkpointing": checkpointing, "peak_gib": round(peak / 1024**3, 2),
            "fits_t4_16gb": peak < T4_BYTES, "images_per_s": round(batch / steady, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="megadescriptor-l-384")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step needs a CUDA GPU")
    result = {
        "what": f"one fp16 training step of {args.backbone}, batch {args.batch}, random weights",
        "device": torch.cuda.get_device_name(0),
        "note": "the device here is not a T4: memory carries over, speed does not",
        "runs": [measure(args.backbone, args.batch, ckpt) for ckpt in (False, True)],
    }
    out = REPO / "benchmarks" / "results" / "gpu_step.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
