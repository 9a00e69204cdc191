"""Training-loader throughput: the prepared-image cache versus decoding the original PNGs.

Makes 8 synthetic 3000 x 2000 RGBA PNGs (smooth shading + blurred and fine noise + shapes,
so they compress and decode like the competition's photos: ~0.16 s per decode), then
measures, in this one process:

- baseline loader: decode the PNG + alpha crop + training resize to 384 x 384;
- cache loader: ``load_prepared`` (JPEG q95, longest side 768) + the same resize;
- the candidate storage formats for the cache (JPEG q95, PNG level 1, raw .npy);
- ``prepare_images`` itself with 1 and 2 workers.

Writes benchmarks/results/prepare.json. Run: ``.venv/bin/python benchmarks/bench_prepare.py``.
Files are read from the page cache in both loaders (written just before), so the figures
compare decoding work, not disk speed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaguar_kit.data.images import apply_alpha_mode, decode_image  # noqa: E402
from jaguar_kit.data.prepare import (  # noqa: E402
    FORMAT,
    load_prepared,
    prepare_images,
    prepared_dir,
)
from jaguar_kit.files import atomic_write_text  # noqa: E402

N_IMAGES = 8
H, W = 2000, 3000
PREPARED = 768
TRAIN = 384
TARGET = 20.0
RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"


def synthetic_rgba(seed: int) -> np.ndarray:
    """A photo-like BGRA frame with an elliptical 'animal' mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = np.stack(
        [np.sin(xx / (80 + 20 * c) + seed) * 60 + np.cos(yy / (50 + 10 * c)) * 50 + 120 for c in range(3)], -1
    )
    texture = cv2.GaussianBlur(rng.normal(0, 40, (H, W, 3)).astype(np.float32), (0, 0), 2)
    img = np.clip(base + texture + rng.normal(0, 6, (H, W, 3)), 0, 255).astype(np.uint8)
    for _ in range(40):  # rosette-like blobs
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        center = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        cv2.circle(img, center, int(rng.integers(10, 80)), color, -1)
    alpha = np.zeros((H, W), np.uint8)
    center = (int(rng.integers(1200, 1800)), int(rng.integers(800, 1200)))
    axes = (int(rng.integers(700, 1000)), int(rng.integers(400, 600)))
    cv2.ellipse(alpha, center, axes, float(rng.integers(-20, 20)), 0, 360, 255, -1)
    return np.dstack([img, alpha])


def throughput(load, items: list, min_seconds: float = 2.0, min_passes: int = 1) -> float:
    """Images per second of ``load`` over ``items``, repeated for at least ``min_seconds``."""
    load(items[0])  # warm-up
    n, passes, t0 = 0, 0, time.perf_counter()
    while passes < min_passes or time.perf_counter() - t0 < min_seconds:
        for item in items:
            load(item)
            n += 1
        passes += 1
    return n / (time.perf_counter() - t0)


def train_resize(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, (TRAIN, TRAIN), interpolation=cv2.INTER_AREA)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        src_dir = work / "train"
        src_dir.mkdir()
        paths = []
        t0 = time.perf_counter()
        for i in range(N_IMAGES):
            p = src_dir / f"train_{i:04d}.png"
            cv2.imwrite(str(p), synthetic_rgba(i))  # cv2's default PNG compression
            paths.append(p)
        print(f"made {N_IMAGES} PNGs in {time.perf_counter() - t0:.1f} s "
              f"({np.mean([p.stat().st_size for p in paths]) / 1e6:.1f} MB each)")

        def baseline(p: Path) -> np.ndarray:
            rgb, mask = decode_image(p)
            return train_resize(apply_alpha_mode(rgb, mask, "crop", 0.05))

        base = throughput(baseline, paths, min_seconds=4.0)
        print(f"baseline (PNG decode + crop + resize): {base:.2f} img/s")

        prep = {}
        for workers in (1, 2):
            root = work / f"cache_w{workers}"
            t0 = time.perf_counter()
            prepared = prepare_images(paths, root, "crop", 0.05, PREPARED, workers=workers, progress=False)
            prep[f"workers_{workers}"] = round(N_IMAGES / (time.perf_counter() - t0), 2)
        files = [prepared[str(p)] for p in paths]
        print(f"prepare: {prep} img/s")

        cache = throughput(lambda f: train_resize(load_prepared(f)), files)
        print(f"cache loader ({FORMAT}): {cache:.1f} img/s, {cache / base:.0f}x")

        # The storage candidates, from the same prepared pixels.
        arrays = [load_prepared(f) for f in files]
        formats = {}
        for name, ext, params in (
            ("jpg95", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]),
            ("png1", ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
            ("npy", ".npy", None),
        ):
            cand = []
            for i, a in enumerate(arrays):
                f = work / f"cand_{name}_{i}{ext}"
                if ext == ".npy":
                    np.save(f, a)
                else:
                    cv2.imwrite(str(f), cv2.cvtColor(a, cv2.COLOR_RGB2BGR), params)
                cand.append(f)
            if ext == ".npy":
                load = lambda f: train_resize(np.load(f))  # noqa: E731
            else:
                load = lambda f: train_resize(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB))  # noqa: E731
            speed = throughput(load, cand, min_seconds=1.5)
            formats[name] = {
                "img_s": round(speed, 1),
                "ratio_vs_png_baseline": round(speed / base, 1),
                "kb_per_image": round(np.mean([f.stat().st_size for f in cand]) / 1e3, 1),
            }
            print(f"  {name}: {formats[name]}")

        ratio = cache / base
        results = {
            "what": "training-loader images/s: prepared cache vs decoding the original RGBA PNGs",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, opencv {cv2.__version__}",
            "images": N_IMAGES,
            "source": f"{W}x{H} RGBA PNG, {np.mean([p.stat().st_size for p in paths]) / 1e6:.1f} MB",
            "prepared": f"{prepared_dir('', 'crop', 0.05, PREPARED).name} (longest side {PREPARED})",
            "train_resize": f"{TRAIN}x{TRAIN} INTER_AREA",
            "baseline_png_loader_img_s": round(base, 2),
            "cache_loader_img_s": round(cache, 1),
            "ratio": round(ratio, 1),
            "target_ratio": TARGET,
            "meets_target": ratio >= TARGET,
            "prepare_img_s": prep,
            "format_candidates": formats,
            "chosen_format": FORMAT,
        }
        atomic_write_text(RESULTS, json.dumps(results, indent=2) + "\n")
        print(f"ratio {ratio:.1f}x (target >= {TARGET:.0f}x) -> {RESULTS}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
