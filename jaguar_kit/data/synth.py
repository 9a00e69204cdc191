"""A procedural synthetic jaguar re-ID competition: the built-in dataset of the demo,
the tests and the benchmarks.

:func:`generate_competition` writes a folder shaped like Kaggle's jaguar-re-id
(facts.md): ``train.csv``, ``train/train/*.png``, ``test.csv``, ``test/test/*.png`` and
``sample_submission.csv``, plus ``solution.csv`` (the test images' identities, for local
scoring) and ``synth.json`` (the parameters, so a finished folder is not made twice).

What makes it a fair re-ID task:

- Identity lives only in the spot *layout*. Every identity has two procedurally drawn
  coats, one per flank (left is not the mirrored right, as in real jaguars), in "coat
  coordinates" (body units: the torso is an ellipse with semi-axes about 1 x 0.42).
  Coat colour, animal size, pose, background, lighting and camera effects are drawn per
  image, independently of the identity, so global image statistics carry no identity.
- Each image is another view of one flank: the coat is warped onto a posed body (torso,
  head, legs, tail), seen through a window that moves by up to +-0.3 body units, so two
  views of one flank share most of the coat and the task is learnable.
- The animal faces the way its flank dictates (left flank: head to the left), as in a
  side-on camera-trap photo; a horizontal flip therefore shows a flank that never exists.

Every image comes from its own RNG, derived from ``(seed, identity, image index)`` with
:class:`numpy.random.SeedSequence`, so the bytes do not depend on ``workers`` or order.

Encounters (``images_per_encounter`` > 1, opt-in): a camera trap takes several photos per
pass. The photos of one encounter show one flank and share the background, the foliage in
front, the light, the coat's colour under it, the camera's info band and the placement
(position, scale, tilt up to a small jitter); pose, coat window, blur and noise vary per
photo. Their encounter is written to train.csv's ``encounter`` column; test photos come
from other encounters than the training photos, as on a real test set.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ..errors import JaguarKitError
from ..files import atomic_write_bytes, atomic_write_text

GENERATOR_VERSION = 1
MANIFEST = "synth.json"

# SeedSequence spawn-key namespaces: one stream per purpose, so that adding identities or
# images never changes the ones already there.
_KEY_COAT, _KEY_FLANKS, _KEY_IMAGE, _KEY_NAMES, _KEY_SHUFFLE, _KEY_ENCOUNTER = range(6)
# The scene an encounter's photos share, one stream each (so the draws of one never shift another's).
_SCENE_BACKGROUND, _SCENE_PLACEMENT, _SCENE_COLOUR, _SCENE_FOLIAGE, _SCENE_LIGHT, _SCENE_CAMERA = range(6)

# The coat canvas in body units (x: head at -, tail at +; y: down). It holds the whole
# posed animal (head, legs, tail) for every window offset.
_X0, _X1, _Y0, _Y1 = -2.6, 3.2, -1.4, 2.0
# Texture pixels per body unit, as a share of the image width; views use scales up to this.
_PPU_PER_WIDTH = 0.26
_SCALE_RANGE = (0.13, 0.26)  # view scale (image px per body unit) as a share of the width
_SHIFT_U, _SHIFT_V = 0.25, 0.1  # largest window offset along / across the body (body units)
_ROT_SD = 0.1  # radians
_P_LIGHT = (0.6, 0.25, 0.15)  # day colour, night infrared, colour flash
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_FIX = float(1 << _SHIFT)

_SYLLABLES = (
    "a ra wi ta ma ka na ju re lo pi su ti ba ce da go ha la mi no pa ri sa to ve ya ze "
    "bo cu fe li mo nu po ru se ji ko ne "
).split()
_ENDINGS = ("", "", "", "", "", "n", "r", "s", "l")


# ----------------------------------------------------------------------------- names


def identity_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, pronounceable names (``Arawi``, ``Tumaka``); a prefix of the list
    for ``n + 1``, so adding identities never renames the existing ones."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_NAMES,)))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.choice([2, 3, 3, 4], p=[0.3, 0.35, 0.3, 0.05]))
        parts = [_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), k)]
        name = ("".join(parts) + _ENDINGS[int(rng.integers(0, len(_ENDINGS)))]).capitalize()
        if len(name) >= 4 and "aa" not in name.lower() and name not in seen:
            seen.add(name)
            names.append(name)
    return names


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


# ----------------------------------------------------------------------------- one image


def _affine(cx: float, cy: float, s: float, theta: float, mirror: bool) -> np.ndarray:
    """2x3 map from posed body units to image pixels."""
    m = -1.0 if mirror else 1.0
    c, si = math.cos(theta), math.sin(theta)
    return np.array([[s * c * m, -s * si, cx], [s * si * m, s * c, cy]])


def _apply(A: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ A[:, :2].T + A[:, 2]


def _body_parts(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The posed silhouette in body units: (far legs, near parts) polygons and landmarks."""
    a, b = rng.uniform(0.95, 1.08), rng.uniform(0.37, 0.46)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    tx, ty = a * np.cos(t), b * np.sin(t)
    ty = ty * (1 + 0.12 * np.clip(-tx / a, 0, 1))  # deeper chest
    torso = np.stack([tx, ty], 1)

    head_y = rng.uniform(-0.4, 0.25)  # head raised .. lowered
    hx = -a - rng.uniform(0.22, 0.35)
    head = _ellipse_pts(hx, head_y, 0.3, 0.24, rng.normal(0, 0.15))
    muzzle = _ellipse_pts(hx - 0.24, head_y + 0.07, 0.15, 0.13)
    ears = [_ellipse_pts(hx + 0.1, head_y - 0.22, 0.075, 0.07), _ellipse_pts(hx - 0.06, head_y - 0.25, 0.07, 0.065)]
    neck = np.array([[-a * 0.55, -b * 0.95], [hx + 0.1, head_y - 0.2], [hx + 0.05, head_y + 0.2], [-a * 0.6, b * 0.75]])

    def leg(hip_x: float, swing: float, rear: bool) -> list[np.ndarray]:
        l1, l2 = rng.uniform(0.42, 0.5), rng.uniform(0.45, 0.55)
        knee_bend = (-0.45 if rear else 0.15) + rng.normal(0, 0.1)
        hip = np.array([hip_x, b * 0.35])
        knee = hip + l1 * np.array([math.sin(swing), math.cos(swing)])
        foot = knee + l2 * np.array([math.sin(swing + knee_bend), math.cos(swing + knee_bend)])
        pts = np.stack([hip, knee, foot])
        band = _ribbon(pts, np.array([0.34 if rear else 0.28, 0.17, 0.13]))
        paw = _ellipse_pts(foot[0] - 0.04, foot[1], 0.11, 0.065)
        return [band, paw]

    phase = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.05, 0.4)  # standing .. walking
    fx, rx = -a * 0.58, a * 0.6
    far = leg(fx + 0.06, amp * math.sin(phase + np.pi), False) + leg(rx + 0.06, amp * math.sin(phase), True)
    near = leg(fx, amp * math.sin(phase), False) + leg(rx, amp * math.sin(phase + np.pi), True)

    n = 14
    steps = np.full(n, rng.uniform(1.0, 1.45) / n)
    curl = rng.uniform(-1.2, 1.6)
    ang = rng.uniform(0.5, 1.3) + curl * np.linspace(0, 1, n) ** 2
    tail_pts = np.concatenate(
        [
            [[a * 0.93, -b * 0.35]],
            [a * 0.93, -b * 0.35] + np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * steps[:, None], 0),
        ]
    )
    tail = _ribbon(tail_pts, np.linspace(0.14, 0.07, n + 1))

    landmarks = {
        "a": a,
        "b": b,
        "eye": (hx - 0.1, head_y - 0.05),
        "nose": (hx - 0.37, head_y + 0.03),
        "feet_y": b * 0.35 + 0.95,
    }
    return far, [tail, torso, neck, head, muzzle, *ears, *near], landmarks


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], ch: int = 1) -> np.ndarray:
    """Value noise: a coarse random grid resized to (h, w), float32 ~N(0, 1)-ish."""
    g = rng.normal(0, 1, (cells[0], cells[1], ch)).astype(np.float32)
    out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, ch) if ch > 1 else out.reshape(h, w)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """One RGB colour in [0, 1] from hue (degrees), saturation and value."""
    px = np.array([[[h_deg / 2, s * 255, v * 255]]], np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide ones run on a downscaled copy (same look, far less time at 3000 px)."""
    if sigma <= 3:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    h, w = img.shape[:2]
    f = sigma / 2
    small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), 2.0), (w, h), interpolation=cv2.INTER_LINEAR)


def _hsv_many(h_deg: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB colours in [0, 1], shape (n, 3), from arrays of hue (degrees), saturation, value."""
    px = np.stack([h_deg / 2, s * 255, v * 255], -1).astype(np.uint8)[None]
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255


def _background(rng: np.random.Generator, h: int, w: int, k: float) -> np.ndarray:
    """Forest-floor clutter: gradients, noise at two scales, trunks, grass and leaves.

    Drawn at half resolution and enlarged: it lies behind the animal, out of focus, and
    this halves the cost of an image.
    """
    h2, w2, k2 = (h + 1) // 2, (w + 1) // 2, k / 2
    top = _hsv(rng.uniform(60, 140), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6))
    bottom = _hsv(rng.uniform(25, 70), rng.uniform(0.25, 0.6), rng.uniform(0.3, 0.65))
    ramp = np.linspace(0, 1, h2, dtype=np.float32)[:, None, None] ** rng.uniform(0.6, 1.6)
    img = (top * (1 - ramp) + bottom * ramp) * np.ones((1, w2, 1), np.float32)
    img += 0.1 * _smooth_noise(rng, h2, w2, (4, 6))[..., None] + 0.06 * _smooth_noise(rng, h2, w2, (18, 27))[..., None]
    img += 0.025 * _smooth_noise(rng, h2, w2, (4, 6), 3)  # a little colour variation
    for _ in range(int(rng.integers(0, 5))):  # trunks
        x = rng.uniform(0, w2)
        tw = rng.uniform(0.02, 0.1) * w2
        lean = rng.normal(0, 0.08) * h2
        poly = np.array(
            [
                [x - tw / 2, -2],
                [x + tw / 2, -2],
                [x + tw / 2 + lean, h2 * rng.uniform(0.55, 1.1)],
                [x - tw / 2 + lean, h2 * rng.uniform(0.55, 1.1)],
            ]
        )
        _fill(
            img,
            [poly],
            tuple(float(v) for v in _hsv(rng.uniform(15, 45), rng.uniform(0.1, 0.45), rng.uniform(0.12, 0.5))),
        )
    n = int(rng.integers(20, 70))  # grass blades and leaves
    cols = _hsv_many(rng.uniform(35, 120, n), rng.uniform(0.25, 0.8, n), rng.uniform(0.15, 0.7, n))
    tt = np.linspace(0, 1, 5)
    for i in range(n):
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(0, w2), rng.uniform(0.35 * h2, 1.05 * h2)
            ln = rng.uniform(0.05, 0.25) * h2
            pts = np.stack([x0 + rng.normal(0, 0.4) * ln * tt**2, y0 - ln * tt], 1)
            poly = _ribbon(pts, np.linspace(rng.uniform(1.5, 4) * k2, 0.3, 5))
        else:
            poly = _ellipse_pts(
                rng.uniform(0, w2),
                rng.uniform(0, h2),
                rng.uniform(3, 12) * k2,
                rng.uniform(1.5, 5) * k2,
                rng.uniform(0, np.pi),
                12,
            )
        _fill(img, [poly], tuple(float(v) for v in cols[i]))
    blur = rng.uniform(0.0, 2.0) * k2  # depth of field
    if blur > 0.25:
        img = _blur(img, blur)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def _occluders(
    rng: np.random.Generator, h: int, w: int, k: float, box: tuple[float, float, float, float]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Foreground foliage in front of the animal: (mask float32 (h, w), colour (h, w, 3)), or
    (None, None) when there is none."""
    x0, y0, x1, y1 = box
    items: list[tuple[np.ndarray, tuple]] = []
    if rng.random() < 0.45:  # grass in front of the legs
        for _ in range(int(rng.integers(3, 25))):
            xb = rng.uniform(x0 - 0.1 * w, x1 + 0.1 * w)
            ln = rng.uniform(0.1, 0.45) * h
            tt = np.linspace(0, 1, 6)
            pts = np.stack([xb + rng.normal(0, 0.35) * ln * tt**2, h + 2 - ln * tt], 1)
            items.append(
                (
                    _ribbon(pts, np.linspace(rng.uniform(2, 5) * k, 0.4, 6)),
                    tuple(float(v) for v in _hsv(rng.uniform(40, 110), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.65))),
                )
            )
    if rng.random() < 0.3:  # a leafy twig
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        for _ in range(int(rng.integers(3, 12))):
            r = rng.uniform(0.02, 0.05) * w
            items.append(
                (
                    _ellipse_pts(
                        cx + rng.normal(0, 0.06 * w),
                        cy + rng.normal(0, 0.06 * w),
                        r,
                        r * rng.uniform(0.3, 0.5),
                        rng.uniform(0, np.pi),
                        16,
                    ),
                    tuple(float(v) for v in _hsv(rng.uniform(70, 130), rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.5))),
                )
            )
    if rng.random() < 0.12:  # a branch across the frame
        y_a, y_b = rng.uniform(0, h, 2)
        pts = np.array([[-5, y_a], [w / 2, (y_a + y_b) / 2 + rng.normal(0, 0.05 * h)], [w + 5, y_b]])
        items.append(
            (
                _ribbon(pts, np.full(3, rng.uniform(0.015, 0.04) * w)),
                tuple(float(v) for v in _hsv(rng.uniform(15, 40), rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.4))),
            )
        )
    if not items:
        return None, None
    mask = np.zeros((h, w), np.float32)
    col = np.zeros((h, w, 3), np.float32)
    for poly, c in items:  # drawn in order: anti-aliased edges blend over what lies behind
        _fill(col, [poly], c)
        _fill(mask, [poly], 1.0)
    return mask, col


def render_image(
    seed: int, identity: int, flank: int, index: int, size: int, encounter: int | None = None
) -> np.ndarray:
    """One camera-trap view of one flank of one identity, as uint8 BGRA (ready for cv2).

    Alpha is the mask of the visible jaguar (0/255); foliage in front and the camera's
    info band are excluded from it. The image is fully determined by the arguments;
    images with the same ``encounter`` (of one identity) share its scene (module docstring).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_IMAGE, identity, index)))

    def scene(purpose: int) -> np.random.Generator:  # the encounter's stream; none: the image's own
        if encounter is None:
            return rng
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_ENCOUNTER, identity, encounter,
                                                                             purpose)))

    w, h = size, int(round(size * 2 / 3))
    k = size / 256  # pixel-sized effects scale with the image
    img = _background(scene(_SCENE_BACKGROUND), h, w, k)

    # --- placement: body units -> image pixels (left flank: head to the left)
    place = scene(_SCENE_PLACEMENT)
    s = w * math.exp(place.uniform(*np.log(_SCALE_RANGE)))
    theta = float(np.clip(place.normal(0, _ROT_SD), -0.3, 0.3))
    cx, cy = w * place.uniform(0.33, 0.67), h * place.uniform(0.38, 0.6)
    if encounter is not None:  # the animal moves a little between the photos of a burst
        s *= math.exp(rng.normal(0, 0.05))
        theta = float(np.clip(theta + rng.normal(0, 0.03), -0.3, 0.3))
        cx, cy = cx + rng.normal(0, 0.03 * w), cy + rng.normal(0, 0.02 * h)
    A = _affine(cx, cy, s, theta, mirror=flank == 1)
    far, near, lm = _body_parts(rng)
    far = [_apply(A, p) for p in far]
    near = [_apply(A, p) for p in near]
    allpts = np.concatenate(far + near)
    bx0, by0 = np.floor(np.maximum(allpts.min(0) - 2, 0)).astype(int)
    bx1, by1 = np.ceil(np.minimum(allpts.max(0) + 2, [w, h])).astype(int)

    # ground shadow under the feet
    feet = _apply(A, np.array([[0.0, lm["feet_y"]]]))[0]
    shadow = np.zeros((h, w), np.float32)
    cv2.ellipse(
        shadow,
        (int(feet[0]), int(feet[1])),
        (int(1.3 * s), max(1, int(0.12 * s))),
        math.degrees(theta),
        0,
        360,
        1.0,
        -1,
    )
    shadow = _blur(shadow, 0.08 * s)
    img *= 1 - rng.uniform(0.2, 0.5) * shadow[..., None]

    sil = np.zeros((h, w), np.float32)
    near_m = np.zeros((h, w), np.float32)
    _fill(sil, far, 1.0)
    _fill(near_m, near, 1.0)
    np.maximum(sil, near_m, out=sil)

    if bx1 > bx0 and by1 > by0:
        # --- coat lookup for every pixel of the animal's box: image -> body -> coat
        ys, xs = np.mgrid[by0:by1, bx0:bx1].astype(np.float32)
        Ainv = cv2.invertAffineTransform(A).astype(np.float32)
        bx = Ainv[0, 0] * xs + Ainv[0, 1] * ys + Ainv[0, 2]
        by = Ainv[1, 0] * xs + Ainv[1, 1] * ys + Ainv[1, 2]
        ks = [float(v) for v in rng.uniform(0.94, 1.06, 2)]
        shear, bend = rng.normal(0, 0.06), rng.normal(0, 0.04)
        du, dv = rng.uniform(-_SHIFT_U, _SHIFT_U), rng.uniform(-_SHIFT_V, _SHIFT_V)
        cu = bx * ks[0] + shear * by + du
        cv = by * ks[1] + bend * (1 - np.clip(bx / lm["a"], -1, 1) ** 2) + dv
        ppu = _PPU_PER_WIDTH * w
        tex = render_coat(seed, identity, flank, ppu)
        coat = cv2.remap(
            tex,
            ((cu - _X0) * ppu).astype(np.float32),
            ((cv - _Y0) * ppu).astype(np.float32),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
        )
        spot = coat[..., 0].astype(np.float32) / 255
        centre = coat[..., 1].astype(np.float32) / 255

        colour = scene(_SCENE_COLOUR)
        base = _hsv(colour.uniform(22, 40), colour.uniform(0.45, 0.8), colour.uniform(0.6, 0.9))
        cream = _hsv(colour.uniform(30, 45), colour.uniform(0.05, 0.2), colour.uniform(0.8, 0.95))
        bb = lm["b"]
        # pale belly under the torso, fading out down the legs
        belly = (
            0.8
            * (
                np.clip((by - 0.6 * bb) / (0.4 * bb), 0, 1)
                * np.clip((1.15 * bb + 0.25 - by) / 0.25, 0, 1)
                * np.clip((1.15 * lm["a"] - np.abs(bx)) / 0.2, 0, 1)
            )[..., None]
        )
        shade = (1.06 - 0.25 * np.clip((by + 0.3 * bb) / bb, -1, 1.3) ** 2)[..., None]  # round body, lit from above
        fur = 1 + 0.1 * _blur(rng.standard_normal(bx.shape, dtype=np.float32), 0.7 * k)[..., None]
        col = (base * (1 - belly) + cream * belly) * shade * fur
        col *= 1 - 0.2 * centre[..., None]
        dark = np.array([0.07, 0.05, 0.04], np.float32) * colour.uniform(0.6, 1.4)
        col = col * (1 - spot[..., None]) + dark * spot[..., None]
        far_only = (sil[by0:by1, bx0:bx1] - near_m[by0:by1, bx0:bx1])[..., None]
        col *= 1 - 0.3 * far_only
        m = sil[by0:by1, bx0:bx1][..., None]
        img[by0:by1, bx0:bx1] = img[by0:by1, bx0:bx1] * (1 - m) + col * m
        for (ex, ey), r, c in ((lm["eye"], 0.035, (0.9, 0.75, 0.2)), (lm["nose"], 0.045, (0.25, 0.12, 0.1))):
            p = _apply(A, np.array([[ex, ey]]))[0]
            cv2.circle(img, (int(p[0] * _FIX), int(p[1] * _FIX)), max(1, int(r * s * _FIX)), c, -1, cv2.LINE_AA, _SHIFT)

    # --- foliage in front; it hides the jaguar (and its mask) where it lies
    occ, occ_col = _occluders(scene(_SCENE_FOLIAGE), h, w, k, (bx0, by0, bx1, by1))
    visible = sil
    if occ is not None:
        visible = sil * (1 - occ)
        if visible.sum() >= 0.4 * sil.sum():  # mostly hidden: drop the foliage, keep the jaguar usable
            img = img * (1 - occ[..., None]) + occ_col * occ[..., None]
        else:
            visible = sil

    # --- light and camera
    light = scene(_SCENE_LIGHT)
    mode = light.choice(3, p=_P_LIGHT)
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2  # for vignetting
    if mode == 0:
        dapple = np.clip(_smooth_noise(light, h, w, (5, 7)) * 1.5, -1, 1)
        img *= (1 + light.uniform(0, 0.3) * dapple)[..., None]
        img *= light.uniform(0.9, 1.1, 3).astype(np.float32)  # white balance
        img *= light.uniform(0.75, 1.25)
    elif mode == 1:
        # near infrared: grey, vegetation bright (chlorophyll reflects NIR), LED falloff
        g = img @ np.array([0.35, 0.55, 0.1], np.float32)
        g = g * light.uniform(1.0, 1.5) * (1 - light.uniform(0.3, 0.6) * np.clip(r2, 0, 1.5))
        img = g[..., None] * light.uniform(0.97, 1.03, 3).astype(np.float32)
    else:
        fx, fy = xx - (bx0 + bx1) / 2, yy - (by0 + by1) / 2
        hot = np.exp(-(fx**2 + fy**2) / (2 * (light.uniform(0.2, 0.45) * w) ** 2))
        depth = np.clip(visible + 0.25 + 0.3 * (yy / h), 0, 1)  # the background lies further away
        img *= ((0.25 + 1.1 * hot) * (1 - 0.45 * np.clip(r2, 0, 1.5)) * (0.55 + 0.45 * depth))[..., None]
    gamma = light.uniform(0.8, 1.25)  # applied to the 8-bit result below, through a table
    blur = rng.uniform(0, 1.2) * k
    if rng.random() < 0.15:  # motion blur along the body
        length = rng.uniform(3, 8) * k
        f = max(1.0, length / 9)  # long streaks: smear a smaller copy (speed at 3000 px)
        ln = int(length / f) | 1
        kern = np.zeros((ln, ln), np.float32)
        kern[ln // 2, :] = 1 / ln
        rot = cv2.getRotationMatrix2D((ln / 2 - 0.5, ln / 2 - 0.5), -math.degrees(theta), 1)
        kern = cv2.warpAffine(kern, rot, (ln, ln))
        if f > 1:
            small = cv2.resize(img, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
            img = cv2.resize(cv2.filter2D(small, -1, kern), (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            img = cv2.filter2D(img, -1, kern)
    elif blur > 0.35:
        img = _blur(img, blur)
    noise_sd = rng.uniform(0.01, 0.035) * (1.8 if mode == 1 else 1.0)
    noise = rng.standard_normal((h, w, 1 if mode == 1 else 3), dtype=np.float32)  # IR: grey noise
    img = np.clip(img + noise * np.float32(noise_sd), 0, 1)

    alpha = (visible > 0.5).astype(np.uint8) * 255
    rgb = (img * 255 + 0.5).astype(np.uint8)
    rgb = cv2.LUT(rgb, (np.linspace(0, 1, 256) ** gamma * 255 + 0.5).astype(np.uint8))
    camera = scene(_SCENE_CAMERA)
    if camera.random() < 0.5:  # camera-trap info band with a timestamp
        bh = max(8, int(0.06 * h))
        top = camera.random() < 0.3
        sl = slice(0, bh) if top else slice(h - bh, h)
        rgb[sl] = 0
        alpha[sl] = 0
        stamp = f"{int(camera.integers(2017, 2025))}-{int(camera.integers(1, 13)):02d}-{int(camera.integers(1, 29)):02d} {int(camera.integers(0, 24)):02d}:{int(camera.integers(0, 60)):02d}:{int(camera.integers(0, 60)):02d}  {int(camera.integers(18, 34))}C  CAM{int(camera.integers(1, 40)):02d}"
        cv2.putText(
            rgb,
            stamp,
            (int(0.02 * w), (0 if top else h - bh) + int(0.75 * bh)),
            cv2.FONT_HERSHEY_SIMPLEX,
            bh / 40,
            (235, 235, 235),
            max(1, bh // 14),
            cv2.LINE_AA,
        )
    return np.dstack([rgb[..., ::-1], alpha])


# ----------------------------------------------------------------------------- the folder


def _check_args(
    identities: int, images_per_identity: int, test_per_identity: int, size: int, seed: int, workers: int
) -> None:
    for name, value, lo in (
        ("identities", identities, 2),
        ("images_per_identity", images_per_identity, 2),
        ("test_per_identity", test_per_identity, 1),
        ("size", size, 64),
        ("seed", seed, 0),
        ("workers", workers, 1),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
            raise JaguarKitError(f"generate_competition: {name} must be an integer >= {lo}, got {value!r}")
    if size > 8192:
        raise JaguarKitError(f"generate_competition: size must be at most 8192, got {size}")
    if identities > 100_000:
        raise JaguarKitError(f"generate_competition: identities must be at most 100000, got {identities}")


def _flanks(seed: int, identity: int, n_train: int, n_test: int) -> list[int]:
    """Flank of each image of one identity: both flanks in train and in test, in random order."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_FLANKS, identity)))
    out = []
    for n in (n_train, n_test):
        start = int(rng.integers(0, 2))
        out += [int(f) for f in rng.permutation([(start + j) % 2 for j in range(n)])]
    return out


def _make_one(task: tuple[str, int, int, int, int, int, int | None]) -> str:
    path, seed, identity, flank, index, size, encounter = task
    ok, buf = cv2.imencode(".png", render_image(seed, identity, flank, index, size, encounter))
    if not ok:  # pragma: no cover - cv2 only fails here on a broken build
        raise JaguarKitError(f"{path}: cv2 could not encode the PNG")
    atomic_write_bytes(path, buf.tobytes())
    return path


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def generate_competition(
    out: str | Path,
    identities: int = 30,
    images_per_identity: int = 10,
    test_per_identity: int = 3,
    size: int = 256,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    images_per_encounter: int = 1,
) -> Path:
    """Write a synthetic jaguar-re-id competition folder at ``out`` and return its path.

    Closed set like the real test: every identity has ``images_per_identity`` train and
    ``test_per_identity`` test images (RGBA PNG, ``size`` x ``2/3 size``). The same
    arguments give byte-identical files for any ``workers``. ``images_per_encounter`` > 1
    groups each identity's consecutive photos into encounters sharing a scene (module
    docstring), named in train.csv's ``encounter`` column. A folder this function
    already finished with the same arguments is returned as it is; a folder with another
    competition's ``train.csv`` in it is refused rather than overwritten.
    """
    _check_args(identities, images_per_identity, test_per_identity, size, seed, workers)
    if not isinstance(images_per_encounter, (int, np.integer)) or images_per_encounter < 1:
        raise JaguarKitError(f"generate_competition: images_per_encounter must be an integer >= 1, "
                             f"got {images_per_encounter!r}")
    m = int(images_per_encounter)
    out = Path(out)
    params = {
        "generator": "jaguar_kit.data.synth",
        "version": GENERATOR_VERSION,
        "identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "test_per_identity": int(test_per_identity),
        "size": int(size),
        "seed": int(seed),
        **({"images_per_encounter": m} if m > 1 else {}),
    }
    manifest = out / MANIFEST
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = None
    if old == {**params, "complete": True}:
        return out
    if (out / "train.csv").exists() and not (isinstance(old, dict) and old.get("generator") == params["generator"]):
        raise JaguarKitError(f"{out}: holds a train.csv not written by generate_competition; choose another folder")
    if out.exists() and not out.is_dir():
        raise JaguarKitError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps({**params, "complete": False}, indent=2) + "\n")

    names = identity_names(identities, seed)
    n_all = images_per_identity + test_per_identity
    n_train_enc = -(-images_per_identity // m)
    train_items, test_items = [], []  # (identity, image index, flank, encounter or None)
    for i in range(identities):
        if m == 1:
            fl, enc = _flanks(seed, i, images_per_identity, test_per_identity), [None] * n_all
        else:  # one flank per encounter; train and test photos never share an encounter
            enc = [j // m if j < images_per_identity else n_train_enc + (j - images_per_identity) // m
                   for j in range(n_all)]
            enc_flank = _flanks(seed, i, n_train_enc, -(-test_per_identity // m))
            fl = [enc_flank[e] for e in enc]
        for j in range(n_all):
            (train_items if j < images_per_identity else test_items).append((i, j, fl[j], enc[j]))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_SHUFFLE,)))
    train_order = rng.permutation(len(train_items))
    test_order = rng.permutation(len(test_items))
    digits = max(4, len(str(max(len(train_items), len(test_items)))))

    tasks, train_rows, test_rows = [], [], []
    for prefix, items, order, rows, folder in (
        ("train", train_items, train_order, train_rows, out / "train" / "train"),
        ("test", test_items, test_order, test_rows, out / "test" / "test"),
    ):
        for number, pos in enumerate(order, start=1):
            i, j, flank, e = items[pos]
            fname = f"{prefix}_{number:0{digits}d}.png"
            rows.append((fname, names[i], "" if e is None else f"{names[i]}-{e:03d}"))
            tasks.append((i, j, (str(folder / fname), seed, i, flank, j, size, e)))
    tasks.sort(key=lambda t: (t[0], t[1]))  # by identity: each coat is drawn once per process
    jobs = [t[2] for t in tasks]

    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), desc="synthetic jaguars", unit="img", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                _make_one(job)
                bar.update()
        else:
            # spawn, not fork: a fork after cv2 has started its thread pool can deadlock
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
                for _ in pool.map(_make_one, jobs, chunksize=n_all):
                    bar.update()

    test_names = [f for f, _, _ in test_rows]
    if m == 1:
        atomic_write_text(out / "train.csv",
                          "filename,ground_truth\n" + "".join(f"{f},{g}\n" for f, g, _ in train_rows))
    else:
        atomic_write_text(out / "train.csv", "filename,ground_truth,encounter\n"
                          + "".join(f"{f},{g},{e}\n" for f, g, e in train_rows))
    atomic_write_text(out / "solution.csv", "filename,ground_truth\n" + "".join(f"{f},{g}\n" for f, g, _ in test_rows))
    pairs = [(q, g) for q in test_names for g in test_names if q != g]
    atomic_write_text(
        out / "test.csv",
        "row_id,query_image,gallery_image\n" + "".join(f"{r},{q},{g}\n" for r, (q, g) in enumerate(pairs)),
    )
    atomic_write_text(
        out / "sample_submission.csv", "row_id,similarity\n" + "".join(f"{r},0.5\n" for r in range(len(pairs)))
    )
    atomic_write_text(manifest, json.dumps({**params, "complete": True}, indent=2) + "\n")
    return out


def encounter_embeddings(
    identities: int = 20, encounters: int = 12, per_encounter: int = 2, dim: int = 128,
    identity_scale: float = 0.6, context: float = 1.0, noise: float = 0.6, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated embeddings of photos taken in encounters: ``(vectors, identities, encounters)``.

    A photo's vector is its identity's direction (scale ``identity_scale``) plus its
    encounter's context (background, light: shared by the encounter's photos, sd
    ``context``) plus its own noise (sd ``noise``). Milliseconds to make, so tests and
    benchmarks of validation schemes can run many seeds; encounter ``e`` of identity ``i``
    is named ``"{i}-{e}"`` (identities ``"id{i}"``), so callers can hold whole encounters out.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_ENCOUNTER,)))
    centre = rng.normal(size=(identities, dim)) * identity_scale
    n = identities * encounters
    ctx = rng.normal(size=(n, dim)) * context
    vectors = np.repeat(centre, encounters * per_encounter, axis=0) + np.repeat(ctx, per_encounter, axis=0)
    vectors += rng.normal(size=vectors.shape) * noise
    ids = np.repeat([f"id{i}" for i in range(identities)], encounters * per_encounter)
    enc = np.repeat([f"{i}-{e}" for i in range(identities) for e in range(encounters)], per_encounter)
    return vectors, ids, enc


__all__ = ["encounter_embeddings", "generate_competition", "identity_names", "coat_pattern", "render_coat",
           "render_image"]
