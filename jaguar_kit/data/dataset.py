"""Torch datasets and transforms over the prepared-image cache.

Augmentations are seeded per sample (``(index, seed)`` items from the batch sampler), so a
batch is the same whichever worker process builds it and whether or not the run was
resumed: exact resume needs augmentation that does not depend on loader state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..errors import JaguarKitError
from ..config import Augment, check_choice
from .prepare import load_prepared



def build_transform(
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    augment: str = "light",
    hflip: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW tensor -> normalised float CHW tensor at ``input_size`` (squash resize).

    ``light`` augmentation: a small random affine (shift, scale, rotation), colour jitter
    and occasional grayscale (night infrared frames). The geometry is applied after the
    same squash resize as evaluation, so rosettes are distorted the same way in training
    and at test time (a random resized crop of the unsquashed image would not be). Heavy
    augmentation hurt in public write-ups (facts.md), so there is no heavier preset.
    Horizontal flip is off unless asked for: a mirrored left flank is not the right flank.
    """
    h, w = input_size
    steps: list[Callable] = [v2.Resize((h, w), antialias=True)]
    if train and augment == "light":
        steps += [
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02),
            v2.RandomGrayscale(p=0.1),
        ]
    else:
        check_choice("train.augment", augment, Augment)
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Prepared images (and labels) -> ``(image tensor, label, index)``.

    Items may be plain indices or ``(index, seed)`` pairs; with a seed the transform runs
    under that seed in a forked RNG, leaving the caller's RNG untouched.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[torch.Tensor], torch.Tensor],
        loader: Callable[[str | Path], np.ndarray] = load_prepared,
    ):
        self.paths = list(paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.paths[index]
        try:
            pixels = self.loader(path)
        except JaguarKitError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read becomes one line naming the file
            raise JaguarKitError(f"{path}: cannot load image ({type(e).__name__}: {e})") from e
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        if seed is None:
            x = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
        label = -1 if self.labels is None else int(self.labels[index])
        return x, label, index


def worker_init(_: int) -> None:
    """One thread per loader worker: workers already run in parallel, and nested thread
    pools on a small machine mostly spin against the training process.

    OpenCV's own pool is left alone here: a forked worker inherits the parent's pool, and
    resizing it (``cv2.setNumThreads``) in the child waits forever on the parent's threads
    (seen after the parent prepared images itself). :func:`loader_safe_opencv` limits it
    in the parent before the workers start.
    """
    torch.set_num_threads(1)


def loader_safe_opencv() -> None:
    """Call before starting forked loader workers: OpenCV single-threaded in this process,
    so the workers inherit no thread pool they could wait on forever."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def sample_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """A per-sample augmentation seed derived from where the sample sits in training."""
    return int(np.random.SeedSequence([seed, epoch, batch, position]).generate_state(1)[0])
