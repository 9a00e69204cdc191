"""Fit the training batch to the GPU before the first step.

Swin-L at 384 px with a PK batch of 8 x 4 in fp16 needs far more than a 16 GB T4 holds
unless gradient checkpointing is on (the 4th-place jaguar-re-id solution trained EVA-02-L
at batch 4 with checkpointing). Rather than fail an hour into a Kaggle session, the engine
runs one probe step at the configured batch before training: on out-of-memory it recomputes
the activations of as few blocks as fit (gradient checkpointing, block by block), and only
if every block is not enough lowers P (identities per batch), keeping K. The probe leaves weights, buffers, optimiser state and every RNG as they were.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..device import DeviceInfo
from ..errors import JaguarKitError
from .state import TrainModule


@dataclass
class MemoryPlan:
    """What the probe settled on, and what it changed from the configured values.

    ``blocks``: how many of the backbone's ``total`` blocks recompute their activations
    (``total``: all of them, i.e. ``model.grad_checkpointing``).
    """

    p: int
    blocks: int
    total: int
    peak_bytes: int | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def grad_checkpointing(self) -> bool:
        return self.blocks >= self.total

    def describe(self) -> str:
        peak = "" if self.peak_bytes is None else f" (probe peak {self.peak_bytes / 2**30:.1f} GiB)"
        if not self.changes:
            return f"the configured batch fits the GPU{peak}"
        return "to fit the GPU's memory: " + "; ".join(self.changes) + peak


def is_out_of_memory(e: BaseException) -> bool:
    """True for CUDA's out-of-memory error (also when a library re-raised it as RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


MARGIN = 0.1  # share of the blocks checkpointed beyond the fewest that fit (see fit_batch)


def fit_batch(try_step: Callable[[int, int], int | None], p: int, k: int, total: int, blocks: int = 0,
              min_p: int = 2, margin: float = MARGIN) -> MemoryPlan:
    """Find the cheapest setting that runs: the configured one; else the fewest checkpointed blocks
    that fit (bisected), plus a margin; else every block checkpointed and a lower P.

    ``try_step(p, blocks)`` runs one step with the first ``blocks`` of the ``total`` blocks
    checkpointed and returns its peak bytes (or None), raising CUDA's out-of-memory error when
    it does not fit. Checkpointing only what is needed keeps most of the speed: recomputing
    every block cost Swin-L 384 26% of its throughput on a large GPU. The margin
    (``margin * total`` blocks more, at least one) leaves room for what a probe does not see:
    allocator fragmentation over hours, a larger batch of longer sequences.
    """
    total = max(int(total), 1)

    def attempt(q: int, b: int) -> tuple[bool, int | None]:
        try:
            return True, try_step(q, b)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_out_of_memory(e):
                raise
            del e
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return False, None

    def plan(q: int, b: int, peak: int | None) -> MemoryPlan:
        changes = []
        if b != blocks:
            changes.append("model.grad_checkpointing=true" if b >= total else
                           f"model.checkpoint_blocks={b} (of {total} blocks)")
        if q != p:
            changes.append(f"train.p={q} (was {p}: batch {q * k} instead of {p * k})")
        return MemoryPlan(q, b, total, peak, changes)

    ok, peak = attempt(p, blocks)
    if ok:
        return plan(p, blocks, peak)
    if blocks < total:
        ok, peak = attempt(p, total)
        if ok:
            lo, hi = blocks, total  # lo does not fit, hi does
            while hi - lo > 1:
                mid = (lo + hi) // 2
                fits, mid_peak = attempt(p, mid)
                lo, hi, peak = (lo, mid, mid_peak) if fits else (mid, hi, peak)
            chosen = min(total, hi + max(1, math.ceil(margin * total)))
            if chosen < total:
                fits, chosen_peak = attempt(p, chosen)
                chosen, peak = (chosen, chosen_peak) if fits else (total, None)
            else:
                chosen = total
            return plan(p, chosen, peak)
    for q in range(p - 1, min_p - 1, -1):
        ok, peak = attempt(q, total)
        if ok:
            return plan(q, total, peak)
    raise JaguarKitError(
        f"one training step does not fit the GPU even at train.p={min_p} with gradient checkpointing; "
        "lower model.img_size or pick a smaller backbone"
    )


def probe_step(module: nn.Module, optimizer: torch.optim.Optimizer, n_classes: int, batch: int, k: int,
               image_size: tuple[int, int], device: torch.device, amp_dtype: torch.dtype | None) -> int | None:
    """Two training steps on random images at lr 0, as the real loop runs them; returns peak bytes.

    Everything it touches is put back: parameters (the optimiser step runs at lr 0),
    BatchNorm statistics, optimiser state, gradients and the RNGs.
    """
    from .checkpoint import capture_rng, restore_rng

    rng = capture_rng()
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    lrs = [g["lr"] for g in optimizer.param_groups]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.randn(batch, 3, *image_size, device=device)
        y = (torch.arange(batch, device=device) // max(k, 1)) % max(n_classes, 1)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        # Twice: the first step allocates AdamW's moments, the second holds them during its
        # forward and backward, as every real step after the first does.
        for _ in range(2):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = module(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        restore_rng(rng)


def _memory_probe_wanted(info: DeviceInfo) -> bool:
    """Only a GPU's memory is tight enough to probe (the tests switch it on to inject an OOM on CPU)."""
    return info.device.type == "cuda"


def plan_memory(cfg: Config, module: TrainModule, optimizer: torch.optim.Optimizer, n_classes: int,
                info: DeviceInfo, world: int, announce: bool) -> dict[str, Any]:
    """On CUDA, the probe step: checkpoint as few blocks as fit, then a lower P, until a step fits.

    Returns the changes as ``{"model.checkpoint_blocks": 14, "train.p": 6}`` (kept in the
    checkpoint, so a resume applies the same plan); on CPU nothing changes.
    """
    if not _memory_probe_wanted(info):
        return {}
    tc, model = cfg.train, module.model
    size = tuple(model.data_config["input_size"][-2:])
    total = len(model.checkpoint_blocks()) or 1  # no blocks found: all or nothing (timm's own)

    def try_step(p: int, blocks: int) -> int | None:
        model.set_checkpoint_blocks(blocks)
        return probe_step(module, optimizer, n_classes, p * tc.k, tc.k, size, info.device, info.amp_dtype)

    configured = total if cfg.model.grad_checkpointing else min(cfg.model.checkpoint_blocks, total)
    plan: MemoryPlan = fit_batch(try_step, tc.p, tc.k, total, configured)
    if world > 1:  # every rank trains with the most careful plan any rank needed
        agreed = torch.tensor([plan.p, -plan.blocks], device=info.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        plan.p, plan.blocks = int(agreed[0]), int(-agreed[1])
    model.set_checkpoint_blocks(plan.blocks)
    if announce:
        print(f"memory probe: {plan.describe()}")
    changes: dict[str, Any] = {}
    if plan.blocks != configured:
        if plan.grad_checkpointing:
            changes["model.grad_checkpointing"] = True
        else:
            changes["model.checkpoint_blocks"] = plan.blocks
    if plan.p != tc.p:
        changes["train.p"] = plan.p
    return changes


def apply_plan(cfg: Config, changes: dict[str, Any]) -> None:
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        setattr(getattr(cfg, section), key, value)
