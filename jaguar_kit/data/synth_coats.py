"""The coats of the synthetic jaguars: each flank's spot layout, drawn in body units.

Identity lives only in this layout (the competition's module docstring, ``synth``): every
identity has two coats, one per flank, each from its own RNG stream, so adding identities
never changes the coats already there. Also the drawing helpers the image renderer shares.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

# SeedSequence spawn-key namespaces: one stream per purpose, so that adding identities or
# images never changes the ones already there.
_KEY_COAT, _KEY_FLANKS, _KEY_IMAGE, _KEY_NAMES, _KEY_SHUFFLE, _KEY_ENCOUNTER, _KEY_SCENE = range(7)

# The coat canvas in body units (x: head at -, tail at +; y: down). It holds the whole
# posed animal (head, legs, tail) for every window offset.
_X0, _X1, _Y0, _Y1 = -2.6, 3.2, -1.4, 2.0
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_FIX = float(1 << _SHIFT)


# ----------------------------------------------------------------------------- geometry


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, ang: float = 0.0, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _ribbon(points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """A tapered band along a polyline, as one closed polygon (limbs, tail, grass)."""
    d = np.gradient(points, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) * (widths[:, None] / 2)
    return np.concatenate([points + normal, (points - normal)[::-1]])


def _fill(img: np.ndarray, polys: list[np.ndarray], value: float | tuple) -> None:
    """Fill polygons one by one (cv2.fillPoly given several uses even-odd: overlaps cancel)."""
    for p in polys:
        cv2.fillPoly(img, [np.round(p * _FIX).astype(np.int32)], value, cv2.LINE_AA, _SHIFT)


# ----------------------------------------------------------------------------- coats


def _ellipses(cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray, ang: np.ndarray, n: int) -> np.ndarray:
    """Many ellipse polygons at once: (len(cx), n, 2)."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = rx[:, None] * np.cos(t), ry[:, None] * np.sin(t)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.stack([cx[:, None] + c * x - s * y, cy[:, None] + s * x + c * y], axis=2)


def coat_pattern(seed: int, identity: int, flank: int) -> dict[str, list[np.ndarray]]:
    """The spot layout of one flank (0 left, 1 right) of one identity, in body units.

    Returns polygons: ``spots`` (dark: broken rosette rings, dots inside rosettes, solid
    spots) and ``centres`` (the slightly darker tawny inside of each rosette). Spacing
    and rosette size vary only a little between identities, so what tells identities
    apart is where the spots are.
    """
    # The identity's coat style, shared by both flanks: individuals differ a little in
    # rosette size, openness and ring thickness (a cue a generic model can pick up), but
    # only the layout below tells two similar-styled jaguars apart.
    style = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_COAT, identity)))
    st = style.uniform(0, 1, 6)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_COAT, identity, flank)))

    # Rosette centres: a jittered hexagonal lattice (random phase and angle) over the flank.
    d = 0.17 + 0.12 * st[0] + rng.uniform(-0.005, 0.005)
    ang = rng.uniform(0, np.pi)
    ii, jj = np.meshgrid(np.arange(-25, 26), np.arange(-25, 26))
    lat = np.stack([ii + 0.5 * (jj % 2), jj * math.sqrt(3) / 2], -1).reshape(-1, 2) * d
    c, s = math.cos(ang), math.sin(ang)
    lat = lat @ np.array([[c, s], [-s, c]]) + rng.uniform(-d, d, 2)
    lat += rng.normal(0, 0.22 * d, lat.shape)
    x, y = lat[:, 0], lat[:, 1]
    keep = (((x - 0.05) / 1.45) ** 2 + ((y - 0.02) / 0.6) ** 2 <= 1.0) & (y > -0.4) & (rng.random(len(x)) > 0.08)
    cx, cy = lat[keep, 0], lat[keep, 1]
    n_ros = len(cx)
    r = d * (0.34 + 0.12 * st[1] + rng.uniform(-0.05, 0.05, n_ros))
    e = rng.uniform(-0.2, 0.2, n_ros)
    rang = rng.uniform(0, np.pi, n_ros)
    rx, ry = r * (1 + e), r * (1 - e)
    centres = _ellipses(cx, cy, rx * 0.95, ry * 0.95, rang, 16)

    # Each ring breaks into 3..6 pieces of random length with gaps between them.
    k_max = 6
    k = rng.integers(3, k_max + 1, n_ros)
    live = np.arange(k_max)[None, :] < k[:, None]
    frac = rng.gamma(4.0, 1.0, (n_ros, k_max)) * live
    frac /= frac.sum(1, keepdims=True)
    ends = np.cumsum(frac, 1) * 2 * np.pi + rng.uniform(0, 2 * np.pi, (n_ros, 1))
    mid = ends - frac * np.pi
    half = frac * np.pi * np.clip(0.5 + 0.38 * st[2] + rng.normal(0, 0.08, (n_ros, k_max)), 0.4, 0.95)
    t = mid[..., None] + half[..., None] * np.linspace(-1, 1, 7)  # (R, K, 7)
    thick = (0.2 + 0.3 * st[3] + rng.uniform(-0.05, 0.05, (n_ros, k_max)))[..., None]  # share of the radius
    rad = 1 + rng.normal(0, 0.06, (n_ros, k_max))[..., None]
    unit = np.stack([np.cos(t), np.sin(t)], -1)
    ring = np.concatenate([unit * (rad + thick / 2)[..., None], (unit * (rad - thick / 2)[..., None])[:, :, ::-1]], 2)
    ring = ring * np.stack([rx, ry], 1)[:, None, None, :]
    cr, sr = np.cos(rang)[:, None, None], np.sin(rang)[:, None, None]
    ring = np.stack([cr * ring[..., 0] - sr * ring[..., 1], sr * ring[..., 0] + cr * ring[..., 1]], -1)
    ring += rng.normal(0, 1, ring.shape) * (0.06 * thick * r[:, None, None])[..., None]
    ring += np.stack([cx, cy], 1)[:, None, None, :]
    spots = list(ring[live])

    # Jaguars (unlike leopards) carry dots inside many rosettes.
    n_dots = rng.binomial(2, 0.2 + 0.5 * st[4], n_ros)
    di = np.repeat(np.arange(n_ros), n_dots)
    off = rng.normal(0, 0.25, (len(di), 2)) * r[di, None]
    rd = r[di] * rng.uniform(0.1, 0.2, len(di))
    spots += list(
        _ellipses(
            cx[di] + off[:, 0],
            cy[di] + off[:, 1],
            rd,
            rd * rng.uniform(0.7, 1.0, len(di)),
            rng.uniform(0, np.pi, len(di)),
            8,
        )
    )

    # Solid spots everywhere else (head, neck, legs, belly, tail), a line along the spine.
    ds = 0.09 + 0.04 * st[5]
    n = int((_X1 - _X0) * (_Y1 - _Y0) / ds**2)
    x, y = rng.uniform(_X0, _X1, n), rng.uniform(_Y0, _Y1, n)
    out = ((x - 0.05) / 1.35) ** 2 + ((y - 0.02) / 0.52) ** 2 > 1.0
    x, y = x[out], y[out]
    rs = ds * rng.uniform(0.15, 0.3, len(x))
    spots += list(_ellipses(x, y, rs * rng.uniform(1.0, 1.6, len(x)), rs, rng.uniform(0, np.pi, len(x)), 10))
    xd = np.arange(-1.3, 1.3, 0.16) + rng.uniform(-0.05, 0.05)
    xd = xd[rng.random(len(xd)) < 0.85]
    m = len(xd)
    spots += list(
        _ellipses(
            xd,
            -0.46 + rng.normal(0, 0.025, m),
            rng.uniform(0.05, 0.08, m),
            rng.uniform(0.022, 0.035, m),
            rng.normal(0, 0.15, m),
            10,
        )
    )
    return {"spots": spots, "centres": list(centres)}


@functools.lru_cache(maxsize=4)
def render_coat(seed: int, identity: int, flank: int, ppu: float) -> np.ndarray:
    """The coat canvas of one flank at ``ppu`` pixels per body unit, as uint8 (H, W, 2):
    channel 0 the dark spots, channel 1 the rosette centres (255 = fully inside).

    Spot edges are roughened with low-frequency noise laid out in body units, so the
    same identity looks the same at every image size.
    """
    pat = coat_pattern(seed, identity, flank)
    w, h = int(round((_X1 - _X0) * ppu)), int(round((_Y1 - _Y0) * ppu))
    origin = np.array([_X0, _Y0])
    out = np.zeros((h, w, 2), np.uint8)
    for ch, key in enumerate(("spots", "centres")):
        layer = np.zeros((h, w), np.uint8)
        _fill(layer, [(p - origin) * ppu for p in pat[key]], 255)
        out[..., ch] = layer
    # Ragged edges: blur, add noise on a grid of 25 cells per body unit, re-threshold.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_COAT, identity, flank, 1)))
    gw, gh = int((_X1 - _X0) * 25), int((_Y1 - _Y0) * 25)
    noise = cv2.resize(rng.normal(0, 1, (gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    sigma = max(0.6, 0.012 * ppu)
    spot = cv2.GaussianBlur(out[..., 0], (0, 0), sigma).astype(np.float32) / 255 + 0.13 * noise
    spot = np.clip((spot - 0.5) * 4 + 0.5, 0, 1)  # a steep smoothstep keeps anti-aliased edges
    out[..., 0] = (spot * 255 + 0.5).astype(np.uint8)
    out[..., 1] = cv2.GaussianBlur(out[..., 1], (0, 0), 2 * sigma)
    return out

