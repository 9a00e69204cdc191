"""The training journey on a real GPU, memory capped to a T4's 15 GiB (needs CUDA).

Runs the engine itself (not a hand-written step) on a small synthetic competition with a
full-size backbone: the memory probe decides, fp16 + GradScaler below sm_80 (bf16 above),
a Ctrl-C (a real SIGINT at step 2) stops it cleanly, a second call resumes and finishes,
and the best checkpoint embeds the test images. Records what the probe chose, peak memory,
training images/s and whether each stage did what a user relies on.

    python benchmarks/gpu_train_journey.py [--backbone megadescriptor-l-384]
    # -> benchmarks/results/gpu_journey.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.config import Config, apply_overrides  # noqa: E402
from jaguar_kit.data.synth import generate_competition  # noqa: E402
from jaguar_kit.pipeline import embed_split  # noqa: E402
from jaguar_kit.train.checkpoint import read_checkpoint  # noqa: E402
from jaguar_kit.train.engine import train  # noqa: E402

T4_BYTES = 15 * 1024**3
GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="megadescriptor-l-384")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_journey.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_journey needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total))
    work = Path(tempfile.mkdtemp(prefix="jk-gpu-"))
    data = generate_competition(work / "data", identities=10, images_per_identity=10, test_per_identity=2, size=320,
                                seed=0, workers=8, progress=False)
    cfg = apply_overrides(Config(), [f"model.backbone={args.backbone}", "model.weights=none", "data.prepared_size=400",
                                     "data.workers=4", "train.epochs=2", "train.checkpoint_every=1"])
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backbone": args.backbone,
                    "cap_gib": 15, "batch": f"{cfg.train.p}x{cfg.train.k}"}
    run = work / "run"

    os.environ["JAGUAR_KIT_FAULT"] = "train-step:2:SIGINT"  # Ctrl-C right after the second step
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    first = train(cfg, data, run, progress=False, resume_roots=[])
    os.environ.pop("JAGUAR_KIT_FAULT")
    saved = read_checkpoint(run / "last.pt")
    result["ctrl_c"] = {"status": first.status, "stop_reason": first.stop_reason,
                        "saved_step": saved.state["global_step"], "memory_plan": saved.memory_plan,
                        "seconds": round(time.perf_counter() - t, 1)}

    t = time.perf_counter()
    second = train(cfg, data, run, progress=False, resume_roots=[])
    seconds = time.perf_counter() - t
    history = [r for r in second.history if r["epoch"] > 0]
    last = read_checkpoint(run / "last.pt")
    steps = last.state["global_step"] - saved.state["global_step"]
    p = last.run_config.train.p
    result["resumed"] = {"status": second.status, "epochs": second.epochs_done, "best_val_map": second.best_map,
                         "frozen_val_map": second.frozen_map, "steps": steps, "seconds": round(seconds, 1),
                         "train_images_per_s_incl_validation": round(steps * p * cfg.train.k / seconds, 1),
                         "finite_losses": all(r["train_loss"] == r["train_loss"] for r in history)}
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    result["fits_t4"] = torch.cuda.max_memory_allocated() < T4_BYTES

    t = time.perf_counter()
    emb = embed_split(second.best_checkpoint, data, "test", work / "cache", work / "prepared", cfg, progress=False)
    result["embed"] = {"images": len(emb.names), "seconds": round(time.perf_counter() - t, 1),
                       "finite": bool(torch.isfinite(torch.from_numpy(emb.vectors)).all())}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
