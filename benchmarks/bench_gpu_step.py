"""Does the default training fit a 16 GB T4? Peak memory and images/s of real backbones (needs CUDA).

For each backbone, memory is capped to a T4's usable 15 GiB with
``torch.cuda.set_per_process_memory_fraction``; the engine's own memory probe
(``jaguar_kit.train.memory``) picks gradient checkpointing and P for the default PK batch
(8 x 4), then timed fp16 + GradScaler steps run with the real model, ArcFace + triplet
criterion and LLRD AdamW. The same step at the configured batch without checkpointing is
also measured uncapped, as the baseline the probe departs from. Random weights are fine for
memory and speed; speed on a faster GPU does not carry over to a T4, memory does.

    python benchmarks/bench_gpu_step.py [--backbones megadescriptor-l-384 eva02-l-448]
    # -> benchmarks/results/gpu_step.json
"""

from __future__ import annotations

import argparse
import gc
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
from jaguar_kit.train.state import TrainModule  # noqa: E402
from jaguar_kit.train.memory import fit_batch, is_out_of_memory, probe_step  # noqa: E402

T4_BYTES = 15 * 1024**3  # usable memory of a 16 GB T4
GIB = 1024**3
N_CLASSES = 31  # jaguars in the competition's train.csv


def timed_steps(module, optimizer, batch: int, k: int, size: tuple[int, int], steps: int) -> dict:
    device = torch.device("cuda")
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 3, *size, device=device)
    y = (torch.arange(batch, device=device) // k) % N_CLASSES
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss, _ = module(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    return {"batch": batch, "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "images_per_s": round(batch / steady, 1), "s_per_step": round(steady, 3)}


def measure(backbone: str, steps: int) -> dict:
    gc.collect()  # the previous backbone's tensors, then its cached blocks, go back to the GPU
    torch.cuda.empty_cache()
    cfg = apply_overrides(Config(), [f"model.backbone={backbone}", "model.weights=none"])
    p, k = cfg.train.p, cfg.train.k
    device = torch.device("cuda")
    model = build_model(cfg.model)
    criterion = ReIDCriterion(cfg.loss, cfg.model.embedding_dim, N_CLASSES)
    module = TrainModule(model, criterion).to(device).train()
    optimizer = build_optimizer(model, criterion, cfg.train)
    size = tuple(model.data_config["input_size"][-2:])
    out: dict = {"backbone": backbone, "img_size": size[0], "configured_batch": f"{p}x{k}"}

    # Baseline: the configured batch, no checkpointing, no cap (does it exceed a T4?).
    torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        out["uncapped_no_checkpointing"] = timed_steps(module, optimizer, p * k, k, size, steps)
    except Exception as e:  # noqa: BLE001
        if not is_out_of_memory(e):
            raise
        out["uncapped_no_checkpointing"] = "out of memory"
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    torch.cuda.empty_cache()

    # T4 cap: the engine's probe decides, then timed steps with its plan.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total))
    probes = []

    n_blocks = len(model.checkpoint_blocks()) or 1

    def try_step(q: int, blocks: int) -> int | None:
        model.set_checkpoint_blocks(blocks)
        t = time.perf_counter()
        try:
            peak = probe_step(module, optimizer, N_CLASSES, q * k, k, size, device, torch.float16)
        except Exception as e:  # noqa: BLE001
            probes.append({"p": q, "checkpoint_blocks": blocks, "result": "out of memory" if is_out_of_memory(e)
                           else f"{type(e).__name__}: {e}"[:200]})
            raise
        probes.append({"p": q, "checkpoint_blocks": blocks, "peak_gib": round(peak / GIB, 2),
                       "probe_s": round(time.perf_counter() - t, 2)})
        return peak

    plan = fit_batch(try_step, p, k, n_blocks, n_blocks if cfg.model.grad_checkpointing else 0)
    out["probe_tries"] = probes
    out["probe_chose"] = {"p": plan.p, "k": k, "checkpoint_blocks": plan.blocks, "of_blocks": n_blocks,
                          "changes": plan.changes, "message": plan.describe()}
    model.set_checkpoint_blocks(plan.blocks)
    run = timed_steps(module, optimizer, plan.p * k, k, size, steps)
    run["fits_t4_15gib"] = run["peak_gib"] * GIB < T4_BYTES
    out["capped_t4_with_plan"] = run
    base = out.get("uncapped_no_checkpointing")
    if isinstance(base, dict):  # the T4 plan's speed as a share of the unconstrained step's
        out["images_per_s_ratio_vs_uncapped"] = round(run["images_per_s"] / base["images_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=["megadescriptor-l-384", "eva02-l-448", "dinov2-l-reg4-518"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_step.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step needs a CUDA GPU")
    import timm

    result = {
        "what": "one fp16 + GradScaler training step at the default PK batch, random weights; "
                "memory capped to a T4's 15 GiB by set_per_process_memory_fraction",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "timm": timm.__version__,
        "note": "the device is not a T4: peak memory carries over, images/s does not (a T4 is several times slower)",
        "runs": [],
    }
    for name in args.backbones:
        t = time.perf_counter()
        try:
            r = measure(name, args.steps)
        except Exception as e:  # noqa: BLE001 - record and go on to the next backbone
            r = {"backbone": name, "error": f"{type(e).__name__}: {e}"[:300]}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        result["runs"].append(r)
        print(json.dumps(r, indent=2), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
