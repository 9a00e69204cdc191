"""One synthetic camera-trap photo: a coat warped onto a posed body, in a scene, through a camera.

:func:`render_image` draws one view of one flank of one identity (``synth_coats``) with a
background, foliage in front, light and camera effects drawn from the image's own RNG, or
shared with the other photos of its encounter (the competition's module docstring, ``synth``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .synth_coats import (
    _FIX,
    _KEY_ENCOUNTER,
    _KEY_IMAGE,
    _KEY_SCENE,
    _SHIFT,
    _X0,
    _Y0,
    _ellipse_pts,
    _fill,
    _ribbon,
    render_coat,
)

# The scene an encounter's photos share, one stream each (so the draws of one never shift another's).
_SCENE_BACKGROUND, _SCENE_PLACEMENT, _SCENE_COLOUR, _SCENE_FOLIAGE, _SCENE_LIGHT, _SCENE_CAMERA = range(6)
# Texture pixels per body unit, as a share of the image width; views use scales up to this.
_PPU_PER_WIDTH = 0.26
_SCALE_RANGE = (0.13, 0.26)  # view scale (image px per body unit) as a share of the width
_SHIFT_U, _SHIFT_V = 0.25, 0.1  # largest window offset along / across the body (body units)
_ROT_SD = 0.1  # radians
_P_LIGHT = (0.6, 0.25, 0.15)  # day colour, night infrared, colour flash


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



def render_scene(seed: int, camera: int, size: int) -> np.ndarray:
    """A camera's empty scene (uint8 BGR, the size of :func:`render_image`'s photos): the static
    background that every photo of one camera trap shows, whichever animal walks past."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_SCENE, camera)))
    w, h = size, int(round(size * 2 / 3))
    rgb = (np.clip(_background(rng, h, w, size / 256), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])
