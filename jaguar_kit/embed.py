"""Embedding images: test-time-augmented forward passes and the resumable chunk cache.

Images go in chunks of ``chunk_size`` (100 by default). Each chunk is embedded under every
TTA view, the views' embeddings are averaged and re-normalised, and the chunk is saved as a
compressed ``.npz`` (embeddings, file names, fingerprint, checksum) written atomically. A
rerun loads the finished chunks and computes only the missing ones; a chunk that fails to
load, fails its checksum or carries another fingerprint is recomputed.

The fingerprint is keyed by content: the weights, the views, the preprocessing settings,
the names, and a digest of every image file's bytes. Another picture saved under the
same name changes its chunk's fingerprint, so that chunk (and only that one) is embedded
again, whoever calls :func:`embed_images` and whatever ``preprocessing`` says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.dataset import ImageDataset, build_transform, loader_safe_opencv, worker_init
from .config import Tta, check_choice
from .errors import JaguarKitError, plain_message
from .chunks import chunk_fingerprint, load_chunk, save_chunk
from .files import file_digest, remove_stale_temporaries

TTA_VIEWS = {
    "none": ("none",),
    "hflip": ("none", "h"),
    "flip4": ("none", "h", "v", "hv"),
}


def _view(x: torch.Tensor, view: str) -> torch.Tensor:
    dims = {"none": [], "h": [-1], "v": [-2], "hv": [-2, -1]}[view]
    return x.flip(dims) if dims else x


@torch.no_grad()
def embed_batch(model: torch.nn.Module, x: torch.Tensor, views: Sequence[str], amp_dtype=None) -> torch.Tensor:
    """Mean of the L2-normalised embeddings of ``x`` under ``views``, re-normalised.

    The views go through the model together as one batch of ``len(views) * B`` images.
    """
    stacked = torch.cat([_view(x, v) for v in views])
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        emb = model(stacked)
    emb = F.normalize(emb.float(), dim=1).view(len(views), x.shape[0], -1).mean(0)
    return F.normalize(emb, dim=1)


def compute_embeddings(
    model: torch.nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    views: Sequence[str] = ("none",),
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype=None,
    progress: bool = False,
    desc: str = "embed",
) -> np.ndarray:
    """Embeddings (float32, L2-normalised) of every item of ``dataset``, in order."""
    was_training = model.training
    model.eval()
    if workers > 0:
        loader_safe_opencv()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, worker_init_fn=worker_init)
    out = []
    try:
        for x, _, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out.append(embed_batch(model, x.to(device, non_blocking=True), views, amp_dtype).cpu())
    except JaguarKitError as e:  # from a loader worker it arrives wrapped in the worker's traceback
        raise JaguarKitError(plain_message(e)) from None
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers (what the embeddings depend on)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def input_config(model: torch.nn.Module) -> tuple[tuple[int, int], tuple, tuple]:
    """``((height, width), mean, std)`` the model's images are resized and normalised to."""
    cfg = getattr(model, "data_config", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    return size, tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))


def cache_key(model: torch.nn.Module, weights_id: str | None = None) -> str:
    """The embedding cache folder of a model: its weights digest and input size.

    The same weights embed at any size (a CNN) and give other vectors at each: each size
    has its own folder, so no size's chunks replace another's.
    """
    (h, w), _, _ = input_config(model)
    return f"{weights_id or weights_digest(model)}-{h}x{w}"


@dataclass
class EmbedResult:
    names: list[str]
    embeddings: np.ndarray
    computed_chunks: list[int]
    reused_chunks: list[int]


def _checksum(emb: np.ndarray) -> str:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return hashlib.sha256(repr(emb.shape).encode() + emb.tobytes()).hexdigest()[:24]


def _load_chunk(path: Path, fingerprint: str, names: Sequence[str]) -> np.ndarray | None:
    """The chunk's embeddings if the file is complete, intact and made for exactly this input."""
    got = load_chunk(path, fingerprint, names, ("embeddings", "checksum"), "jaguar_kit embedding chunk")
    if got is None:
        return None
    emb = got["embeddings"]
    if emb.ndim != 2 or emb.shape[0] != len(names) or emb.dtype != np.float32 or not np.isfinite(emb).all():
        return None
    if str(got["checksum"]) != _checksum(emb):  # rewritten by something else than this module
        return None
    return emb


def embed_images(
    model: torch.nn.Module,
    names: Sequence[str],
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    device: torch.device,
    tta: str = "flip4",
    chunk_size: int = 100,
    batch_size: int = 32,
    preprocessing: dict | None = None,
    amp_dtype=None,
    tag: str = "images",
    progress: bool = True,
    weights_id: str | None = None,
) -> EmbedResult:
    """Embed prepared images chunk by chunk into ``cache_dir``, reusing finished chunks.

    ``preprocessing`` describes how the prepared images were made (alpha mode, size, ...);
    it enters the fingerprint together with the weights, the TTA views and a digest of each
    image file's bytes, so a cached chunk is only reused for exactly the same computation on
    the same pictures. ``weights_id`` saves hashing the weights again when the caller already
    did (:func:`weights_digest`). Bad input raises a one-line :class:`JaguarKitError`.
    """
    check_choice("embed.tta", tta, Tta)
    if chunk_size < 1 or batch_size < 1:
        raise JaguarKitError(f"embed: chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    names, paths = [str(n) for n in names], list(paths)
    if len(names) != len(paths):
        raise JaguarKitError(f"embed {tag}: {len(names)} names but {len(paths)} image paths")
    seen: set[str] = set()
    dup = next((n for n in names if n in seen or seen.add(n)), None)
    if dup is not None:
        raise JaguarKitError(f"embed {tag}: image name {dup!r} is listed twice")
    views = TTA_VIEWS[tta]
    size, mean, std = input_config(model)
    transform = build_transform(size, mean, std, train=False)
    base = json.dumps(
        {"weights": weights_id or weights_digest(model), "views": views, "input": size, "prep": preprocessing or {}},
        sort_keys=True,
    )
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaguarKitError(f"{cache_dir}: cannot create the embedding cache ({e.strerror or e})") from e
    remove_stale_temporaries(cache_dir)  # half-written chunks of a killed run (not a live process's)
    n_chunks = (len(names) + chunk_size - 1) // chunk_size
    parts, computed, reused = [], [], []
    bar = tqdm(total=len(names), desc=f"embed {tag} ({len(views)} views)", disable=not progress)
    for c in range(n_chunks):
        sl = slice(c * chunk_size, (c + 1) * chunk_size)
        chunk_names, chunk_paths = list(names[sl]), list(paths[sl])
        fp = chunk_fingerprint(base, chunk_names, [file_digest(p, what="image to embed") for p in chunk_paths])
        path = cache_dir / f"{tag}_{c:05d}.npz"
        emb = _load_chunk(path, fp, chunk_names)
        if emb is None:
            ds = ImageDataset(chunk_paths, None, transform)
            # batch_size counts images per forward pass, views included: the views of an image
            # go through together, and a forward costs (and holds) the same whatever the TTA.
            emb = compute_embeddings(model, ds, device, views, max(1, batch_size // len(views)), amp_dtype=amp_dtype)
            emb = emb.astype(np.float32)
            save_chunk(path, fp, chunk_names, "chunk-write", embeddings=emb, checksum=np.array(_checksum(emb)))
            computed.append(c)
        else:
            reused.append(c)
        parts.append(emb)
        bar.update(len(chunk_names))
    bar.close()
    embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return EmbedResult(list(names), embeddings, computed, reused)
