"""Local-feature verification: SIFT matches inside the animal's mask on a global shortlist.

HotSpotter (2013) identified jaguars from SIFT keypoints; WildFusion (2024) fused such
matches with a global embedding and gained most on spotted species. Here, for every query
only the ``k`` most similar gallery images by the global similarity are matched (a
shortlist: all pairs of the real test set would be 137,270 matches), and each match gives
two numbers: the RANSAC inlier count and the inlier ratio (inliers / ratio-test matches).
:mod:`jaguar_kit.retrieval.verify` matches the shortlists and
:mod:`jaguar_kit.retrieval.fusion` turns the numbers, with the global similarity, into one
calibrated probability that re-ranks the shortlist.

The pipeline per image, all OpenCV, no weights, offline:

1. decode the source (RGBA PNG: the alpha channel is the animal's mask), crop to the mask's
   box (+5 %), resize so the longest side is ``size`` px;
2. gray, CLAHE (day, infrared and flash photos differ mostly in contrast), SIFT keypoints
   detected only inside the mask (the whole crop where there is no mask), at most
   ``max_keypoints`` of them;
3. RootSIFT descriptors (L1-normalise, square root: Euclidean distance then compares
   Hellinger kernels, which matches better than raw SIFT, Arandjelovic & Zisserman 2012).

Matching: nearest and second-nearest neighbour, Lowe's ratio test (0.8), then RANSAC
with ``cv2.estimateAffinePartial2D`` -- a similarity transform (rotation, uniform scale,
translation; 4 degrees of freedom, 2 points per sample). Chosen over ``findHomography``:
a flank is not a plane, so a homography's extra freedom fits noise, and its 4-point
minimal samples always "explain" 4 random matches -- on the synthetic set different
individuals scored a median 4 homography inliers against 2 similarity inliers, with the
same separation of true pairs, and the similarity fit is 1.7x faster (3.7 vs 6.2 ms per
pair at 640 px). A similarity transform also cannot mirror: together with SIFT
descriptors, which are not mirror-invariant, and no flipped copies ever being made, a
left flank is only ever matched against images as they were taken (same flank only:
a mirrored left flank is not the right flank). Transforms scaling by more than 4x or
rotating by more than 60 degrees are rejected (camera-trap animals stand upright).

Features are computed once per image and cached in chunks of 100 (``.npz``, written
atomically) named by a fingerprint of the settings and of the SHA-256 of each image's
bytes: a rerun after a kill recomputes only the missing chunks, and a changed image or
setting never reuses stale features.

Learned matchers (kornia's DISK / ALIKED + LightGlue) are a hook, not a default: any
object with ``extract(rgb, mask) -> ImageFeatures`` and ``match(a, b) -> MatchScore``
can be passed as ``matcher``; kornia downloads their weights at run time, so such a
matcher must load weights attached as an input (this module never fetches anything).

The static scene: without a mask (a JPEG camera-trap photo, or a box cut from one),
keypoints also land on the background, and two photos of *different* animals taken by the
same camera share that background -- the same trunks, leaves and timestamp band at the
same pixels. Such matches are geometrically perfect (an identity transform) and RANSAC
keeps them all. So every keypoint also keeps its position in the original photo (the
frame), and a tentative match whose two keypoints lie within ``STATIC_SHARE`` of the
frame's longest side of each other, in two unmasked photos of the same frame size, is
dropped before RANSAC: an animal does not stand on the same pixels in the same pose in two
photos, the scene does (:func:`static_scene` has the measured effect). Masked keypoints
lie on the animal, so masked photos are matched exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from .chunks import chunk_fingerprint, load_chunk, save_chunk
from .data.images import MASK_THRESHOLD, crop_box, cut_box, decode_image
from .errors import JaguarKitError
from .files import file_digest, remove_stale_temporaries
from .processes import run_tasks

log = logging.getLogger(__name__)

FEATURE_VERSION = 2  # bump when extraction changes: cached features are then recomputed (2: frame positions)
MAX_SCALE = 4.0  # largest accepted scale change between two views of one flank
MAX_ROTATION_DEG = 60.0
# A match moving less than this share of the frame's longest side is the static scene (module
# docstring): 2 % is 6 px on a 288 px frame, 38 px on a 1920 px one -- above the jitter of a
# keypoint re-detected in a recompressed JPEG (about 1 px), below how far an animal moves
# between two photos (a burst of the synthetic jaguars: 3 % of the width, one sd).
STATIC_SHARE = 0.02


@dataclass(frozen=True)
class LocalSettings:
    """How local features are extracted and matched (everything a cached feature depends on)."""

    size: int = 640  # longest side (px) of the animal crop
    max_keypoints: int = 1000
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 0.02  # RANSAC reprojection threshold as a share of ``size``
    crop_margin: float = 0.05
    use_mask: bool = True  # detect keypoints only inside the alpha mask
    clahe: bool = True

    def check(self) -> "LocalSettings":
        if self.size < 32:
            raise JaguarKitError(f"local features: size must be >= 32 px, got {self.size}")
        if self.max_keypoints < 2:
            raise JaguarKitError(f"local features: need at least 2 keypoints per image, got {self.max_keypoints}")
        if not 0.0 < self.ratio <= 1.0:
            raise JaguarKitError(f"local features: ratio test must be in (0, 1], got {self.ratio}")
        return self

    def extraction_key(self) -> str:
        """What a cached feature depends on (matching settings are left out)."""
        d = asdict(self)
        for k in ("ratio", "ransac_px"):
            d.pop(k)
        return json.dumps({"v": FEATURE_VERSION, "opencv": cv2.__version__.split(".")[0], **d}, sort_keys=True)


@dataclass
class ImageFeatures:
    points: np.ndarray  # (n, 2) float32 keypoint positions in the resized crop
    descriptors: np.ndarray  # (n, 128) float32 RootSIFT, unit L2 norm
    shape: tuple[int, int]  # (height, width) of the resized crop
    # where the keypoints lie in the original photo (the static-scene rule); None: unknown
    frame_points: np.ndarray | None = None  # (n, 2) float32 positions in the photo's pixels
    frame_shape: tuple[int, int] | None = None  # (height, width) of the photo
    masked: bool = False  # keypoints were detected inside the animal's mask only

    def __len__(self) -> int:
        return int(self.points.shape[0])


@dataclass
class MatchScore:
    inliers: int  # RANSAC inliers of the similarity transform
    matches: int  # tentative matches that passed the ratio test

    @property
    def ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0


class Matcher(Protocol):
    """The hook for other local features (a learned matcher with attached weights)."""

    def extract(self, rgb: np.ndarray, mask: np.ndarray | None) -> ImageFeatures: ...

    def match(self, a: ImageFeatures, b: ImageFeatures) -> MatchScore: ...


# ----------------------------------------------------------------------------- extraction


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT: L1-normalise, then square root (rows end with unit L2 norm)."""
    d = np.asarray(desc, dtype=np.float32)
    d = d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(d)


def _crop(rgb: np.ndarray, mask: np.ndarray | None, s: LocalSettings) -> tuple[np.ndarray, np.ndarray | None]:
    return _placed_crop(rgb, mask, s)[:2]


def _placed_crop(rgb: np.ndarray, mask: np.ndarray | None, s: LocalSettings):
    """:func:`_crop`, and where the crop lies in ``rgb``: ``(crop, mask, (x0, y0, sx, sy))``, the crop
    showing ``rgb`` from ``(x0, y0)`` on, resized by ``sx`` across and ``sy`` down."""
    x0 = y0 = 0
    if mask is not None:
        box = crop_box(mask, s.crop_margin)
        if box is None:  # fully transparent: no usable mask, keep the whole picture
            mask = None
        else:
            x0, y0, x1, y1 = box
            rgb, mask = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    scale, (h, w) = s.size / max(rgb.shape[:2]), rgb.shape[:2]
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=interp)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if mask is not None:
        mask = np.where(mask >= MASK_THRESHOLD, 255, 0).astype(np.uint8)
    return rgb, mask, (x0, y0, rgb.shape[1] / w, rgb.shape[0] / h)


class SiftMatcher:
    """OpenCV SIFT -> RootSIFT, ratio test, RANSAC similarity transform (see the module doc)."""

    def __init__(self, settings: LocalSettings = LocalSettings()):
        self.settings = settings.check()
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)

    def extract(self, rgb: np.ndarray, mask: np.ndarray | None) -> ImageFeatures:
        """Features of ``rgb`` (the frame their ``frame_points`` are positioned in)."""
        s = self.settings
        frame_shape = tuple(rgb.shape[:2])
        rgb, mask, (x0, y0, sx, sy) = _placed_crop(rgb, mask, s)
        masked = mask is not None and s.use_mask
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        if s.clahe:
            gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
        sift = cv2.SIFT_create(nfeatures=s.max_keypoints)
        kps, desc = sift.detectAndCompute(gray, mask if s.use_mask else None)
        if desc is None or not kps:
            none = np.zeros((0, 2), np.float32)
            return ImageFeatures(none, np.zeros((0, 128), np.float32), gray.shape[:2], none, frame_shape, masked)
        kps, desc = kps[: s.max_keypoints], desc[: s.max_keypoints]
        pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        # a resized pixel's centre (p + 0.5) / scale - 0.5 in the frame's pixels
        frame = ((pts + 0.5) / np.array([sx, sy], np.float32) - 0.5 + np.array([x0, y0], np.float32))
        return ImageFeatures(pts, rootsift(desc), tuple(gray.shape[:2]), frame, frame_shape, masked)

    def match(self, a: ImageFeatures, b: ImageFeatures) -> MatchScore:
        if len(a) < 2 or len(b) < 2:
            return MatchScore(0, 0)
        pairs = self._matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < self.settings.ratio * n.distance]
        qi, ti = [m.queryIdx for m in good], [m.trainIdx for m in good]
        if same_scene(a, b):
            keep = ~static_scene(a.frame_points[qi], b.frame_points[ti], a.frame_shape)
            qi, ti = np.asarray(qi, np.int64)[keep], np.asarray(ti, np.int64)[keep]
        src = a.points[qi].reshape(-1, 2)
        dst = b.points[ti].reshape(-1, 2)
        inliers = similarity_inliers(src, dst, self.settings)
        return MatchScore(int(inliers.sum()), len(src))


def same_scene(a: ImageFeatures, b: ImageFeatures) -> bool:
    """Whether the static-scene rule applies between two photos: both unmasked, of one frame size."""
    return (a.frame_shape is not None and a.frame_shape == b.frame_shape and not a.masked and not b.masked
            and a.frame_points is not None and b.frame_points is not None)


def static_scene(src: np.ndarray, dst: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Which tentative matches ``src[i] -> dst[i]`` (frame positions) are the static scene (bool mask).

    Both keypoints within ``STATIC_SHARE`` of the frame's longest side of each other: the
    background, not the animal (the module docstring). Measured on the own-photos coat test's
    synthetic jaguars (8 catalogued individuals x 4 photos, 3 new ones, 288 px), saved as JPEG
    without masks, before -> after this rule:

    - each photo on its own background (the camera's timestamp band the only shared scene):
      most inliers with a *different* catalogued animal 21 -> 7; the calibration's estimate of
      photos decided correctly 59 % -> 88 %; identify: 10 -> 15 of 16
      sightings of known animals decided right, no new animal merged;
    - every animal pasted into one of two camera scenes (:func:`~jaguar_kit.data.synth_image.render_scene`):
      most inliers with a different animal 36 -> 3; decided correctly 25 % -> 94 %; identify:
      6 -> 15 of 16 right, wrong animal 1 -> 0, new animals merged 1 -> 0 of 9.

    The 7 left in the first case are timestamp glyphs shifted along the band by the digits'
    unequal widths (a translation of 4-8 % of the frame): text, not a coat, but not static.
    """
    src, dst = np.asarray(src, np.float32).reshape(-1, 2), np.asarray(dst, np.float32).reshape(-1, 2)
    return np.hypot(*(src - dst).T) < STATIC_SHARE * max(frame_shape)


def similarity_inliers(src: np.ndarray, dst: np.ndarray, settings: LocalSettings) -> np.ndarray:
    """Which tentative matches ``src[i] -> dst[i]`` a RANSAC similarity transform keeps (bool mask).

    All ``False`` when there are fewer than 3 matches (two points always fit a similarity
    transform: no evidence) or the transform is implausible for an upright animal.
    """
    none = np.zeros(len(src), bool)
    if len(src) < 3:
        return none
    transform, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                                 ransacReprojThreshold=settings.ransac_px * settings.size,
                                                 maxIters=2000, confidence=0.99)
    if transform is None or inl is None:
        return none
    scale = math.hypot(transform[0, 0], transform[1, 0])
    angle = abs(math.degrees(math.atan2(transform[1, 0], transform[0, 0])))
    if not (1.0 / MAX_SCALE <= scale <= MAX_SCALE) or angle > MAX_ROTATION_DEG:
        return none
    return inl.ravel().astype(bool)


def image_digest(path: str | Path) -> str:
    """A digest of a file's bytes: the content key of its cached features."""
    return file_digest(path, 16, "image")


def crop_for_features(path: str | Path, box, settings: LocalSettings, where: str = "") -> np.ndarray:
    """The RGB crop that an image's keypoints are positioned in (decoded, boxed, masked crop, resized)."""
    rgb, mask = cut_box(*decode_image(path), box, where or str(path))
    return _crop(rgb, mask, settings)[0]


def _extract_file(task: tuple[str, tuple | None, LocalSettings, str]) -> ImageFeatures:
    path, box, settings, digest = task
    if file_digest(path, len(digest), "image") != digest:  # cached under this content: never other pixels
        raise JaguarKitError(f"{path}: changed since it was read (other content); restore it, or index the photos again")
    rgb, mask = decode_image(path)
    frame_shape = tuple(rgb.shape[:2])
    rgb, mask = cut_box(rgb, mask, box, path)
    f = SiftMatcher(settings).extract(rgb, mask if settings.use_mask else None)
    if box is not None:  # the keypoints' positions in the whole photo, not in its box
        x0, y0 = min(box[0], frame_shape[1]), min(box[1], frame_shape[0])  # as cut_box cuts it
        f = replace(f, frame_points=f.frame_points + np.array([x0, y0], np.float32), frame_shape=frame_shape)
    return f


# ----------------------------------------------------------------------------- the cache

CHUNK_FIELDS = ("counts", "shapes", "points", "descriptors", "frame_points", "frames")


def _save_chunk(path: Path, feats: list[ImageFeatures], names: list[str], fingerprint: str) -> None:
    save_chunk(
        path, fingerprint, names, "local-chunk-write",
        counts=np.array([len(f) for f in feats], dtype=np.int64),
        shapes=np.array([f.shape for f in feats], dtype=np.int64).reshape(-1, 2),
        points=np.concatenate([f.points for f in feats]) if feats else np.zeros((0, 2), np.float32),
        frame_points=np.concatenate([f.frame_points for f in feats]) if feats else np.zeros((0, 2), np.float32),
        frames=np.array([(*f.frame_shape, f.masked) for f in feats], dtype=np.int64).reshape(-1, 3),
        # float16 halves the cache; RootSIFT values lie in [0, 1] and matching does not notice
        descriptors=(np.concatenate([f.descriptors for f in feats]) if feats
                     else np.zeros((0, 128), np.float32)).astype(np.float16),
    )


def _load_chunk(path: Path, fingerprint: str, names: list[str]) -> list[ImageFeatures] | None:
    """The chunk's features if the file is complete and made for exactly these images."""
    z = load_chunk(path, fingerprint, names, CHUNK_FIELDS, "jaguar_kit local-feature chunk")
    if z is None:
        return None
    counts, shapes, points, desc, frame_points, frames = (z[k] for k in CHUNK_FIELDS)
    if len(counts) != len(names) or counts.sum() != len(points) or len(points) != len(desc):
        return None
    if len(frame_points) != len(points) or frames.shape != (len(names), 3):
        return None
    if not np.isfinite(points).all() or not np.isfinite(desc).all() or not np.isfinite(frame_points).all():
        return None
    ends = np.cumsum(counts)
    return [ImageFeatures(points[end - n:end].astype(np.float32), desc[end - n:end].astype(np.float32),
                          (int(shapes[i, 0]), int(shapes[i, 1])), frame_points[end - n:end].astype(np.float32),
                          (int(frames[i, 0]), int(frames[i, 1])), bool(frames[i, 2]))
            for i, (n, end) in enumerate(zip(counts, ends))]


@dataclass
class FeatureResult:
    names: list[str]
    features: list[ImageFeatures]
    computed_chunks: int
    reused_chunks: int


def compute_local_features(
    names: Sequence[str],
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    settings: LocalSettings = LocalSettings(),
    chunk_size: int = 100,
    workers: int = 0,
    progress: bool = True,
    boxes: Sequence | None = None,
    digests: Sequence[str] | None = None,
) -> FeatureResult:
    """SIFT features of every image, through a resumable, content-keyed chunk cache.

    ``paths`` are the source images (an RGBA PNG's alpha channel is the mask); ``boxes``
    (x, y, w, h or None per image) cut each photo to its animal first. Chunk files are named
    by their fingerprint (settings, names, image bytes and boxes), so several image sets share
    one folder without clashing and any rerun reuses them. ``workers`` > 1 extracts in that
    many processes. ``digests``: the images' :func:`image_digest`-style content digests when the
    caller knows them (any length; an image whose features must be computed is checked against
    its digest first), so that cached features are found without reading the images.
    """
    settings.check()
    boxes = [None] * len(paths) if boxes is None else [None if b is None else tuple(map(int, b)) for b in boxes]
    digests = [None] * len(paths) if digests is None else list(digests)
    if not len(names) == len(paths) == len(boxes) == len(digests):
        raise JaguarKitError(f"local features: {len(names)} names, {len(paths)} paths, {len(boxes)} boxes")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    base = settings.extraction_key()
    feats: list[ImageFeatures] = []
    computed = reused = 0
    with tqdm(total=len(names), desc="local features", unit="img", disable=not progress) as bar:
        for c in range(0, len(names), chunk_size):
            chunk_names = [str(n) for n in names[c : c + chunk_size]]
            chunk_paths = [str(p) for p in paths[c : c + chunk_size]]
            chunk_boxes = boxes[c : c + chunk_size]
            chunk_digests = [d or image_digest(p) for p, d in zip(chunk_paths, digests[c : c + chunk_size])]
            fp = chunk_fingerprint(base, chunk_names, [f"{d}{'' if b is None else b}"
                                                       for d, b in zip(chunk_digests, chunk_boxes)])
            path = cache_dir / f"local_{fp}.npz"
            got = _load_chunk(path, fp, chunk_names)
            if got is None:
                got = []
                tasks = [(p, b, settings, d) for p, b, d in zip(chunk_paths, chunk_boxes, chunk_digests)]
                for f in run_tasks(_extract_file, tasks, workers):
                    got.append(f)
                    bar.update()
                _save_chunk(path, got, chunk_names, fp)
                # the features as the chunk keeps them (float16 descriptors): a later run that reads
                # the chunk back then matches, and decides, exactly as this one
                got = [replace(f, descriptors=f.descriptors.astype(np.float16).astype(np.float32)) for f in got]
                computed += 1
            else:
                reused += 1
                bar.update(len(chunk_names))
            feats.extend(got)
    return FeatureResult([str(n) for n in names], feats, computed, reused)


__all__ = [
    "LocalSettings",
    "ImageFeatures",
    "MatchScore",
    "Matcher",
    "SiftMatcher",
    "rootsift",
    "same_scene",
    "similarity_inliers",
    "static_scene",
    "crop_for_features",
    "image_digest",
    "compute_local_features",
]
