"""Image decoding with OpenCV and the use of the alpha mask.

The competition's images are RGBA PNGs whose alpha channel is a segmentation mask of the
jaguar (the RGB background is still present). Camera-trap photos from ecologists are JPEGs
without a mask. :func:`decode_image` turns any of them into ``(RGB uint8, mask | None)``;
:func:`apply_alpha_mode` uses the mask to crop to the animal, blank the background, or
ignore it.

Empty masks: a fully transparent image (no pixel with alpha >= ``MASK_THRESHOLD``) has no
usable mask. :func:`apply_alpha_mode` then returns the full image unchanged rather than an
empty crop or a black picture; callers that want to count or report such images check
:func:`mask_is_empty` (``prepare_images`` does, and lists them in its summary).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..config import AlphaMode, check_choice
from ..errors import JaguarKitError

# Alpha >= this is "the animal". The competition's masks are 0/255; a threshold at half
# keeps anti-aliased edges that are mostly opaque and drops faint halo noise.
MASK_THRESHOLD = 128


# Extension -> format name; the formats accepted: the competition's PNG, cameras' JPEG, and
# the other photo formats every OpenCV build decodes (libtiff, libwebp, OpenJPEG are bundled
# in opencv-python's wheels; GIF and AVIF are not in every build, HEIC and raw files in none).
# Magic bytes decide the real format; a mismatch is refused.
IMAGE_EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF",
                    ".bmp": "BMP", ".webp": "WEBP", ".jp2": "JPEG 2000"}
_FORMAT_EXTENSION = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp",
                     "JPEG 2000": ".jp2"}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # IEND chunk type + its fixed CRC
_OTHER_MAGICS = (  # formats without a closer check (GIF is recognised only to name it in the error)
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
)
_TAIL = 4096


def sniff_format(head: bytes) -> str | None:
    """Name of the image format from a file's first bytes ("PNG", "JPEG", ...), or None."""
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            return name
    return None


def _problem(name: str, size: int, head: bytes, tail: bytes) -> tuple[str, str] | None:
    """``(kind, what is wrong)`` from a file's size, first and last bytes; None if fine."""
    if size == 0:
        return "empty", "zero-byte file"
    fmt = sniff_format(head)
    ext = Path(name).suffix.lower()
    expected = IMAGE_EXTENSIONS.get(ext)
    if fmt is None:
        shown = " ".join(f"{b:02x}" for b in head[:8])
        return "unknown", f"unknown image format (first bytes {shown}); expected {', '.join(_FORMAT_EXTENSION)}"
    if fmt not in _FORMAT_EXTENSION:
        return "unsupported", f"is a {fmt} file, not a format read here ({', '.join(_FORMAT_EXTENSION)}): convert it to PNG"
    if expected != fmt:
        new_name = Path(name).stem + _FORMAT_EXTENSION[fmt]
        return "mismatch", (
            f"is a {fmt} file named {ext or 'without extension'}: rename it to {new_name} "
            "(and in the CSV)"
        )
    if fmt == "PNG" and _PNG_IEND not in tail[-64:]:
        return "truncated", "truncated PNG (no IEND chunk at the end)"
    # Some cameras pad after the end-of-image marker, so look for it near the end.
    if fmt == "JPEG" and b"\xff\xd9" not in tail.rstrip(b"\x00")[-_TAIL:]:
        return "truncated", "truncated JPEG (no end-of-image marker)"
    return None


def image_file_problem(path: str | Path) -> tuple[str, str] | None:
    """Cheap check without decoding: reads the first and last bytes only.

    Returns ``(kind, what is wrong)`` - kind is one of empty, truncated, mismatch,
    unknown, unsupported, missing, unreadable - or None when the file looks like a
    complete PNG/JPEG whose extension matches its content.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, 2)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except FileNotFoundError:
        return "missing", "file not found"
    except OSError as e:
        return "unreadable", f"cannot read ({e.strerror or e})"
    return _problem(path.name, size, head, tail)


def check_image_file(path: str | Path) -> str | None:
    """What is wrong with an image file (see :func:`image_file_problem`), or None."""
    problem = image_file_problem(path)
    return None if problem is None else problem[1]


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)  # rounds, full range kept
    raise JaguarKitError(f"{path}: unsupported pixel type {img.dtype} (expected 8 or 16 bit)")


def decode_image(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image (PNG, JPEG, TIFF, ...) into ``(rgb (H, W, 3) uint8, mask (H, W) uint8 or None)``.

    RGBA and gray+alpha give the alpha channel as the mask; RGB, grayscale and JPEG give
    no mask. 16-bit images are scaled to 8 bit. A broken file raises a one-line
    :class:`JaguarKitError` naming it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaguarKitError(f"{path}: cannot read image ({e.strerror or e})") from e
    return decode_image_bytes(data, path)


def decode_image_bytes(data: bytes, path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`decode_image` of bytes already read from ``path`` (named in errors; its
    extension must match the content). Lets a caller hash and decode one read of the file."""
    path = Path(path)
    problem = _problem(path.name, len(data), data[:16], data[-_TAIL:])
    if problem:
        raise JaguarKitError(f"{path}: {problem[1]}")
    buf = np.frombuffer(data, np.uint8)
    if IMAGE_EXTENSIONS[path.suffix.lower()] == "JPEG":
        # IMREAD_COLOR applies the EXIF orientation of camera photos (UNCHANGED does not).
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise JaguarKitError(f"{path}: OpenCV cannot decode this image (corrupt file?)")
    img = _to_uint8(img, path)
    if img.ndim == 2 or img.shape[2] == 1:
        gray = img.reshape(img.shape[:2])
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), None
    channels = img.shape[2]
    if channels == 2:  # gray + alpha (OpenCV usually expands it to BGRA already)
        return cv2.cvtColor(np.ascontiguousarray(img[..., 0]), cv2.COLOR_GRAY2RGB), img[..., 1].copy()
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), img[..., 3].copy()
    raise JaguarKitError(f"{path}: unsupported number of channels {channels}")


def cut_box(rgb: np.ndarray, mask: np.ndarray | None, box, where: str):
    """Crop image and mask to ``box`` (x, y, w, h), clipped to the image; an empty box is an error."""
    if box is None:
        return rgb, mask
    x, y, w, h = box
    H, W = rgb.shape[:2]
    x0, y0, x1, y1 = min(x, W), min(y, H), min(x + w, W), min(y + h, H)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise JaguarKitError(f"{where}: box x,y,w,h = {x},{y},{w},{h} lies outside the {W}x{H} photo")
    return rgb[y0:y1, x0:x1], None if mask is None else mask[y0:y1, x0:x1]


def mask_is_empty(mask: np.ndarray | None) -> bool:
    """True when there is a mask but no pixel of it is the animal (fully transparent)."""
    return mask is not None and not bool((mask >= MASK_THRESHOLD).any())


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (ends exclusive) of the animal, or None if empty."""
    fg = mask >= MASK_THRESHOLD
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """The mask's box grown by ``margin`` x its width/height on each side, clipped to the image."""
    box = mask_box(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    mx, my = round(margin * (x1 - x0)), round(margin * (y1 - y0))
    h, w = mask.shape[:2]
    return max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)


def apply_alpha_mode(
    rgb: np.ndarray, mask: np.ndarray | None, mode: str, margin: float = 0.05
) -> np.ndarray:
    """Use the animal's mask: ``crop`` to its box (+ margin), ``blank`` the background, or ``ignore``.

    No mask, or an empty one (see :func:`mask_is_empty`), returns ``rgb`` unchanged: a
    picture without a usable mask is better kept whole than dropped or blacked out.
    """
    check_choice("data.alpha_mode", mode, AlphaMode)
    if margin < 0:
        raise JaguarKitError(f"crop margin must be >= 0, got {margin}")
    if mode == "ignore" or mask is None:
        return rgb
    if mask.shape[:2] != rgb.shape[:2]:
        raise JaguarKitError(f"mask shape {mask.shape[:2]} differs from image shape {rgb.shape[:2]}")
    if mode == "crop":
        box = crop_box(mask, margin)
        if box is None:
            return rgb
        x0, y0, x1, y1 = box
        return np.ascontiguousarray(rgb[y0:y1, x0:x1])
    fg = mask >= MASK_THRESHOLD
    if not fg.any():
        return rgb
    return np.where(fg[..., None], rgb, np.uint8(0))
