"""Retrieval grids show the right images with the right frames; curves render."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from jaguar_kit import viz
from jaguar_kit.errors import JaguarKitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def colour_of(i: int) -> tuple[int, int, int]:
    """A distinct, frame-unlike RGB colour per image index."""
    return (20 + 37 * i % 200, 60 + 53 * i % 180, 200 - 29 * i % 150)


def loader(name: str) -> np.ndarray:
    i = int(name.split("_")[1].split(".")[0])
    h, w = (90, 140) if i % 2 else (150, 70)  # both orientations get letterboxed
    return np.full((h, w, 3), colour_of(i), dtype=np.uint8)


def read_rgb(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture
def case():
    n = 8
    names = [f"img_{i}.png" for i in range(n)]
    labels = ["A", "A", "A", "B", "B", "B", "C", "C"]
    rng = np.random.default_rng(0)
    sim = rng.uniform(0, 0.5, (n, n))
    sim[0, 0] = 9.0  # self must never be shown as a match
    sim[0, 2], sim[0, 4], sim[0, 1] = 0.9, 0.8, 0.7  # query 0: right, wrong, right
    sim[5, 3], sim[5, 6] = 0.95, 0.95  # a tie: lower index (3, right) first, then 6 (wrong)
    return names, labels, sim


def test_grid_shows_top_matches_with_green_right_and_red_wrong_frames(tmp_path, case):
    names, labels, sim = case
    out = viz.save_retrieval_grid(sim, names, loader, tmp_path / "grid.png", labels=labels, queries=[0, 5], top_k=3)
    img = read_rgb(out)
    assert img.shape == (viz._frame_box(1, 3)[3] + viz.GAP, viz._frame_box(1, 3)[2] + viz.GAP, 3)
    expected = {0: [0, 2, 4, 1], 5: [5, 3, 6]}
    for r, q in enumerate([0, 5]):
        for c, j in enumerate(expected[q]):
            x0, y0, x1, y1 = viz._frame_box(r, c)
            frame = tuple(img[(y0 + y1) // 2, x0 + viz.BORDER // 2])  # middle of the left frame edge
            want = viz.QUERY if c == 0 else (viz.RIGHT if labels[j] == labels[q] else viz.WRONG)
            assert frame == want, (q, c, j, frame)
            centre = tuple(img[(y0 + y1) // 2, (x0 + x1) // 2])
            assert np.abs(np.subtract(centre, colour_of(j))).max() <= 2, (q, c, j)
    assert tuple(img[viz._frame_box(0, 1)[1] + 2, viz._frame_box(0, 1)[0] + 2]) == viz.RIGHT
    assert tuple(img[viz._frame_box(0, 2)[1] + 2, viz._frame_box(0, 2)[0] + 2]) == viz.WRONG


def test_grid_without_labels_uses_neutral_frames_and_default_queries(tmp_path, case):
    names, _, sim = case
    out = viz.save_retrieval_grid(sim, names, loader, tmp_path / "g.png", n_queries=4, top_k=5)
    img = read_rgb(out)
    assert out.stat().st_size > 5_000
    assert img.shape[0] == viz._frame_box(3, 5)[3] + viz.GAP  # 4 rows
    x0, y0, x1, y1 = viz._frame_box(2, 4)
    assert tuple(img[(y0 + y1) // 2, x0 + 2]) == viz.UNLABELLED
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_grid_rejects_bad_input(tmp_path, case):
    names, labels, sim = case
    with pytest.raises(JaguarKitError, match="shape"):
        viz.save_retrieval_grid(sim[:5], names, loader, tmp_path / "g.png")
    with pytest.raises(JaguarKitError, match="query index 8"):
        viz.save_retrieval_grid(sim, names, loader, tmp_path / "g.png", queries=[8])
    with pytest.raises(JaguarKitError, match="img_0.png: load_image must return uint8"):
        viz.save_retrieval_grid(sim, names, lambda n: np.zeros((5, 5, 3)), tmp_path / "g.png", queries=[0])
    assert not (tmp_path / "g.png").exists()


def test_training_curves_from_csv_with_missing_validation(tmp_path):
    df = pd.DataFrame(
        {
            "epoch": np.arange(1, 9),
            "train_loss": np.linspace(5, 1, 8),
            "val_map": [np.nan, 0.4, np.nan, 0.55, np.nan, 0.6, np.nan, 0.62],
            "val_rank1": [np.nan, 0.5, np.nan, 0.6, np.nan, 0.7, np.nan, 0.72],
        }
    )
    csv = tmp_path / "metrics.csv"
    df.to_csv(csv, index=False)
    out = viz.save_training_curves(csv, tmp_path / "curves.png")
    img = read_rgb(out)
    assert img.shape == (400, 1000, 3)
    assert out.stat().st_size > 10_000
    assert (img != 255).any(axis=2).mean() > 0.02  # something was drawn
    # Only NaN validation (before the first validation) still renders.
    viz.save_training_curves(df.assign(val_map=np.nan, val_rank1=np.nan), tmp_path / "early.png")
    assert (tmp_path / "early.png").read_bytes()[:8] == PNG_MAGIC


def test_training_curves_missing_column_is_a_one_line_error(tmp_path):
    with pytest.raises(JaguarKitError, match="missing column\\(s\\) val_rank1"):
        viz.save_training_curves(pd.DataFrame({"epoch": [1], "train_loss": [1.0], "val_map": [0.5]}), tmp_path / "c.png")
