"""Pictures people would rather look at than numbers: retrieval grids, training curves.

The retrieval grid is composed as a pixel array with cv2 (exact layout, fast, no font
or DPI surprises); training curves use matplotlib through its Agg canvas directly, so
no global pyplot backend is touched (safe inside notebooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .errors import JaguarKitError
from .files import atomic_path, atomic_write_bytes

# Retrieval-grid layout, in pixels.
THUMB = 160  # thumbnail box (image letterboxed inside)
BORDER = 6  # coloured frame around each thumbnail
CAPTION = 34  # two text lines above each frame
GAP = 8
QUERY_GAP = 16  # extra space between the query and its matches

RIGHT = (0, 170, 0)  # RGB frame of a true match
WRONG = (220, 0, 0)  # RGB frame of a wrong match
QUERY = (40, 70, 200)
UNLABELLED = (150, 150, 150)
_BACKGROUND = (255, 255, 255)


def _frame_box(row: int, col: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the frame of grid cell (row, col); col 0 is the query."""
    cell_w = THUMB + 2 * BORDER
    cell_h = CAPTION + THUMB + 2 * BORDER
    x0 = GAP + col * (cell_w + GAP) + (QUERY_GAP if col > 0 else 0)
    y0 = GAP + row * (cell_h + GAP) + CAPTION
    return x0, y0, x0 + cell_w, y0 + THUMB + 2 * BORDER


def _as_rgb(img: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise JaguarKitError(f"{name}: load_image must return uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise JaguarKitError(f"{name}: load_image must return an (H, W, 3) RGB image, got shape {a.shape}")
    return a[:, :, :3]


def _thumbnail(img: np.ndarray) -> np.ndarray:
    """Letterbox ``img`` into a THUMB x THUMB white square, aspect kept."""
    import cv2

    h, w = img.shape[:2]
    scale = THUMB / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((THUMB, THUMB, 3), 255, dtype=np.uint8)
    y, x = (THUMB - nh) // 2, (THUMB - nw) // 2
    out[y : y + nh, x : x + nw] = small
    return out


def _fit(text: str, max_px: int, scale: float) -> str:
    import cv2

    while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > max_px:
        text = text[:-2] + "~" if len(text) > 2 else ""
    return text


def save_retrieval_grid(
    similarity: np.ndarray,
    names: Sequence[str],
    load_image: Callable[[str], np.ndarray],
    out_png: str | Path,
    labels: Sequence | None = None,
    queries: Sequence[int] | None = None,
    top_k: int = 5,
    n_queries: int = 6,
) -> Path:
    """A PNG with one row per query: the query, then its ``top_k`` most similar others.

    The query itself is never among its matches; ties go to the lower index (as in the
    metric). With ``labels``, matches of the query's identity are framed green, others
    red, and identities are printed. ``queries`` default: ``n_queries`` indices spread
    evenly over the set. ``load_image(name)`` returns RGB uint8 pixels.
    """
    import cv2

    from .metrics import ranked_others

    sim = np.asarray(similarity)
    n = len(names)
    if sim.ndim != 2 or sim.shape != (n, n) or n < 2:
        raise JaguarKitError(f"{out_png}: similarity has shape {sim.shape} but there are {n} names")
    if labels is not None and len(labels) != n:
        raise JaguarKitError(f"{out_png}: {len(labels)} labels for {n} names")
    if queries is None:
        queries = np.unique(np.linspace(0, n - 1, max(1, min(n_queries, n))).round().astype(int))
    queries = [int(q) for q in queries]
    bad = [q for q in queries if not 0 <= q < n]
    if bad:
        raise JaguarKitError(f"{out_png}: query index {bad[0]} is outside 0..{n - 1}")
    if not queries:
        raise JaguarKitError(f"{out_png}: no query to show")
    top_k = max(1, min(int(top_k), n - 1))
    order = ranked_others(sim, np.asarray(queries))[:, :top_k]

    x_end, y_end = _frame_box(len(queries) - 1, top_k)[2:]
    canvas = np.full((y_end + GAP, x_end + GAP, 3), _BACKGROUND, dtype=np.uint8)
    font, scale, ink = cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0)
    width = THUMB + 2 * BORDER
    for r, q in enumerate(queries):
        for c, j in enumerate([q, *order[r].tolist()]):
            x0, y0, x1, y1 = _frame_box(r, c)
            if c == 0:
                colour = QUERY
            elif labels is None:
                colour = UNLABELLED
            else:
                colour = RIGHT if labels[j] == labels[q] else WRONG
            canvas[y0:y1, x0:x1] = colour
            canvas[y0 + BORDER : y1 - BORDER, x0 + BORDER : x1 - BORDER] = _thumbnail(
                _as_rgb(load_image(names[j]), str(names[j]))
            )
            line1 = ("query " if c == 0 else f"#{c} ") + str(names[j])
            line2 = "" if labels is None else str(labels[j])
            if c > 0:
                line2 = f"{line2} {float(sim[q, j]):.3f}".strip()
            cv2.putText(canvas, _fit(line1, width, scale), (x0, y0 - 20), font, scale, ink, 1, cv2.LINE_AA)
            cv2.putText(canvas, _fit(line2, width, scale), (x0, y0 - 6), font, scale, ink, 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise JaguarKitError(f"{out_png}: PNG encoding failed")
    atomic_write_bytes(out_png, png.tobytes())
    return Path(out_png)


CURVE_COLUMNS = ("epoch", "train_loss", "val_map", "val_rank1")


def save_training_curves(metrics: str | Path | pd.DataFrame, out_png: str | Path) -> Path:
    """Training loss and validation mAP / rank-1 per epoch, side by side, as a PNG.

    ``metrics``: a DataFrame or the path of a CSV with columns epoch, train_loss,
    val_map, val_rank1 (validation columns may be NaN on epochs without validation).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    where = str(metrics) if not isinstance(metrics, pd.DataFrame) else "metrics"
    if isinstance(metrics, pd.DataFrame):
        df = metrics
    else:
        if not Path(metrics).is_file():
            raise JaguarKitError(f"{where}: metrics file not found")
        df = pd.read_csv(metrics)
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise JaguarKitError(f"{where}: missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise JaguarKitError(f"{where}: no rows to plot")
    df = df.sort_values("epoch")

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    loss = df.dropna(subset=["train_loss"])
    ax_loss.plot(loss["epoch"], loss["train_loss"], marker="o", ms=3, color="tab:blue")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    val = df.dropna(subset=["val_map"])
    if len(val):
        ax_val.plot(val["epoch"], val["val_map"], marker="o", ms=3, label="mAP", color="tab:green")
        best = val.loc[val["val_map"].idxmax()]
        ax_val.annotate(f"best {best['val_map']:.3f}", (best["epoch"], best["val_map"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    r1 = df.dropna(subset=["val_rank1"])
    if len(r1):
        ax_val.plot(r1["epoch"], r1["val_rank1"], marker="s", ms=3, label="rank-1", color="tab:orange")
    if len(val) or len(r1):
        ax_val.legend(loc="lower right")
    else:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set(title="validation (identity-balanced)", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


__all__ = ["save_retrieval_grid", "save_training_curves"]
