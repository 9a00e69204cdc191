"""The embedding model behind a catalogue, and the embeddings of photos it gives.

A catalogue's embeddings depend on the model's weights and on how photos were prepared
(alpha mode, margin, prepared size, TTA): :class:`Model` carries all of it, and its
``fingerprint`` is what a catalogue records so that embeddings of different models never mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from .inputs import Photo, prepare_photos

@dataclass
class Model:
    """A loaded embedding model with the preprocessing its embeddings depend on."""

    module: object  # torch.nn.Module
    source: str
    digest: str
    alpha_mode: str = "crop"
    margin: float = 0.05
    prepared_size: int = 768
    tta: str = "none"
    device: object = None
    amp_dtype: object = None

    @property
    def fingerprint(self) -> dict:
        """Everything an embedding depends on; two catalogues with different ones never mix."""
        return {"digest": self.digest, "alpha_mode": self.alpha_mode, "margin": self.margin,
                "prepared_size": self.prepared_size, "tta": self.tta}


def load_model(source: str | Path, device: str = "auto", weights: str = "auto", prepared_size: int | None = None,
               tta: str = "none") -> Model:
    """A training checkpoint (``best.pt``) or ``frozen:BACKBONE`` (pretrained, e.g. ``frozen:efficientnet-lite0``).

    A checkpoint brings its own preprocessing (alpha mode, margin, prepared size); a frozen
    backbone uses the config defaults. ``tta`` is ``none`` by default: flips hurt on jaguars
    (a mirrored left flank is not the right flank).
    """
    # torch-heavy modules load on first use: `import jaguar_kit.photos` stays light for the CLI's error paths
    from ..device import select_device
    from ..embed import weights_digest
    from ..models.loading import load_model as load_source

    info = select_device(device)
    source = str(source)
    wanted = Config()
    wanted.model.weights = weights
    module, cfg = load_source(source, wanted, info.device)
    d = cfg.data
    return Model(module, source, weights_digest(module), d.alpha_mode, float(d.crop_margin),
                 int(prepared_size or d.prepared_size), tta, info.device, info.amp_dtype)


def embed_photos(model: Model, photos: Sequence[Photo], cache_dir: str | Path, progress: bool = True,
                 batch_size: int = 32, workers: int = 0) -> tuple[list[str], np.ndarray, list[Path]]:
    """Content keys, L2-normalised embeddings (N, D) and prepared files of ``photos``.

    Prepared photos and embedding chunks are cached under ``cache_dir`` (resumable).
    """
    cache_dir = Path(cache_dir)
    keys, files = prepare_photos(photos, cache_dir / "prepared", model.alpha_mode, model.margin,
                                 model.prepared_size, workers=workers, progress=progress)
    return keys, embed_prepared(model, keys, files, cache_dir, progress, batch_size), files


def embed_prepared(model: Model, keys: Sequence[str], files: Sequence[Path], cache_dir: str | Path,
                   progress: bool = True, batch_size: int = 32) -> np.ndarray:
    """Embeddings of prepared photos (rows follow ``keys``; each distinct key is embedded once)."""
    from ..embed import embed_images  # torch: deferred like load_model's

    first: dict[str, Path] = {}
    for k, f in zip(keys, files):
        first.setdefault(k, f)
    unique = list(first)
    if not unique:
        return np.zeros((0, 0), np.float32)
    res = embed_images(model.module, unique, [first[k] for k in unique], Path(cache_dir) / "embeddings" / model.digest,
                       model.device, tta=model.tta, batch_size=batch_size,
                       preprocessing={"alpha": model.alpha_mode, "margin": model.margin, "size": model.prepared_size,
                                      "keys": "content"},
                       amp_dtype=model.amp_dtype, tag="photos", progress=progress, weights_id=model.digest)
    row = {k: i for i, k in enumerate(unique)}
    return res.embeddings[[row[k] for k in keys]].astype(np.float32)

