"""The chunked four-flip embedder against the raw model forward on the same images.

Target: no overhead beyond the views themselves, i.e. the embedder with four views within
10% of four times the single-view forward time (both include image loading and
transforms; the embedder also writes its compressed chunks).

    .venv/bin/python benchmarks/bench_embed.py   # -> benchmarks/results/embed.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaguar_kit.config import ModelConfig  # noqa: E402
from jaguar_kit.data.competition import load_competition  # noqa: E402
from jaguar_kit.data.dataset import ImageDataset, build_transform  # noqa: E402
from jaguar_kit.data.prepare import prepare_images  # noqa: E402
from jaguar_kit.data.synth import generate_competition  # noqa: E402
from jaguar_kit.embed import embed_images  # noqa: E402
from jaguar_kit.models import build_model  # noqa: E402

BATCH = 24  # images per forward: the raw loop's 24 images, the embedder's 6 images x 4 views


def raw_forward_seconds(model, paths) -> float:
    cfg = model.data_config
    ds = ImageDataset(paths, None, build_transform(cfg["input_size"][-2:], cfg["mean"], cfg["std"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH)
    t = time.perf_counter()
    with torch.no_grad():
        for x, _, _ in loader:
            model(x)
    return time.perf_counter() - t


def main() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="efficientnet-lite0", weights="auto", img_size=160)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = generate_competition(work / "data", identities=10, images_per_identity=20, size=256, progress=False)
        comp = load_competition(data)
        prepared = prepare_images(list(comp.train["path"]), work / "prep", size=256, workers=0, progress=False)
        names = list(comp.train["filename"])
        paths = [prepared[n] for n in names]
        raw_forward_seconds(model, paths[:BATCH])  # warm-up
        single, four = [], []
        for r in range(3):
            single.append(raw_forward_seconds(model, paths))
            t = time.perf_counter()
            embed_images(model, names, paths, work / f"cache{r}", torch.device("cpu"), tta="flip4", chunk_size=100,
                         batch_size=BATCH, progress=False)
            four.append(time.perf_counter() - t)
    ratio = min(four) / min(single)
    result = {
        "what": f"{len(names)} images, efficientnet-lite0 at 160 px, CPU; seconds",
        "raw_forward_single_view_s": round(min(single), 3),
        "embedder_four_views_s": round(min(four), 3),
        "ratio": round(ratio, 3),
        "target": "ratio <= 4.4 (within 10% of 4x)",
        "overhead_beyond_views": round(ratio / 4 - 1, 4),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = REPO / "benchmarks" / "results" / "embed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
