"""Local features: extraction inside the mask, matching, and the resumable feature cache."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from jaguar_kit.data.synth_image import render_image, render_scene
from jaguar_kit.local import LocalSettings, SiftMatcher, compute_local_features, rootsift
from jaguar_kit.photos.coat import CoatIndex

SETTINGS = LocalSettings(size=384, max_keypoints=600)


def rgba(identity: int, flank: int, index: int, size: int = 384):
    bgra = render_image(0, identity, flank, index, size)
    return cv2.cvtColor(bgra[..., :3], cv2.COLOR_BGR2RGB), bgra[..., 3].copy()


def test_rootsift_rows_are_unit_and_nonnegative():
    d = rootsift(np.random.default_rng(0).integers(0, 255, (50, 128)).astype(np.float32))
    assert (d >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_keypoints_lie_inside_the_mask():
    rgb, mask = rgba(0, 0, 0)
    m = SiftMatcher(SETTINGS)
    f = m.extract(rgb, mask)
    assert len(f) > 20
    from jaguar_kit.local import _crop

    _, crop_mask = _crop(rgb, mask, SETTINGS)
    x = np.clip(np.round(f.points[:, 0]).astype(int), 0, crop_mask.shape[1] - 1)
    y = np.clip(np.round(f.points[:, 1]).astype(int), 0, crop_mask.shape[0] - 1)
    assert (crop_mask[y, x] > 0).mean() > 0.97  # keypoint centres (sub-pixel) sit on the animal


def test_same_flank_matches_and_mirror_or_other_animal_does_not():
    m = SiftMatcher(SETTINGS)
    a = m.extract(*rgba(1, 0, 0))
    b = m.extract(*rgba(1, 0, 1))  # another view of the same flank
    other = m.extract(*rgba(2, 0, 0))
    rgb, mask = rgba(1, 0, 1)
    mirrored = m.extract(np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    same, diff, mirror = m.match(a, b), m.match(a, other), m.match(a, mirrored)
    assert same.inliers >= 15, same
    assert diff.inliers <= 6 and mirror.inliers <= 6, (diff, mirror)
    assert 0.0 <= same.ratio <= 1.0


def test_features_cache_resumes_and_is_content_keyed(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"x{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), render_image(0, i % 3, 0, i, 192))
        paths.append(p)
    names = [p.name for p in paths]
    s = LocalSettings(size=192, max_keypoints=200)
    first = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert (first.computed_chunks, first.reused_chunks) == (3, 0)
    # A killed run leaves chunks missing; a rerun computes only those.
    victim = sorted((tmp_path / "cache").glob("local_*.npz"))[0]
    victim.unlink()
    again = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert (again.computed_chunks, again.reused_chunks) == (1, 2)
    for f, g in zip(first.features, again.features):
        np.testing.assert_array_equal(f.points, g.points)
        np.testing.assert_array_equal(f.descriptors, g.descriptors)  # as stored: a rerun decides the same
    # A changed image (same name) and a corrupt chunk are recomputed, never reused.
    cv2.imwrite(str(paths[4]), render_image(0, 2, 0, 99, 192))
    next(iter(sorted((tmp_path / "cache").glob("local_*.npz")))).write_bytes(b"not a zip")
    third = compute_local_features(names, paths, tmp_path / "cache", s, chunk_size=2, progress=False)
    assert third.computed_chunks >= 1 and third.reused_chunks <= 2
    fresh = compute_local_features(names, paths, tmp_path / "fresh", s, chunk_size=2, progress=False)
    np.testing.assert_array_equal(third.features[4].points, fresh.features[4].points)
    # Another setting never reuses these features.
    other = compute_local_features(names, paths, tmp_path / "cache", LocalSettings(size=160, max_keypoints=200),
                                   chunk_size=2, progress=False)
    assert other.reused_chunks == 0


def _in_scene(scene: np.ndarray, bgra: np.ndarray) -> np.ndarray:
    """The animal of a rendered photo (its alpha) pasted into a camera's scene, as that camera takes it."""
    return np.where(bgra[..., 3:] > 127, bgra[..., :3], scene)


def test_the_static_scene_of_one_camera_is_not_evidence(tmp_path):
    # JPEG camera-trap photos (no mask): two different animals in front of one camera's scene,
    # and the first animal again in another photo of that scene and in a scene of its own
    scene = render_scene(0, 0, 384)
    photos = {"a": _in_scene(scene, render_image(0, 1, 0, 0, 384)),
              "other animal": _in_scene(scene, render_image(0, 2, 0, 0, 384)),
              "a again": _in_scene(scene, render_image(0, 1, 0, 1, 384)),
              "a elsewhere": render_image(0, 1, 0, 3, 384)[..., :3]}
    paths = []
    for name, bgr in photos.items():
        paths.append(tmp_path / f"{name}.jpg")
        cv2.imwrite(str(paths[-1]), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    # the same photos once more as boxes cut from them (a detector's boxes: the scene
    # inside them lies at other places of the boxes, at the same places of the frames)
    boxes = [None] * 4 + [(40, 20, 300, 220), (70, 30, 300, 220), (20, 10, 330, 230), (50, 20, 300, 220)]
    f = compute_local_features([f"{i}" for i in range(8)], paths * 2, tmp_path / "cache", SETTINGS,
                               progress=False, boxes=boxes).features
    m = SiftMatcher(SETTINGS)
    for a, other, again, elsewhere in (f[:4], f[4:]):
        scene_only = replace(other, frame_shape=None)  # without the frame, the old matching
        assert m.match(a, scene_only).inliers >= 20  # the test could fail: the scene alone matches
        assert m.match(a, other).inliers <= 6, m.match(a, other)
        assert m.match(a, again).inliers >= 15, m.match(a, again)  # the animal still matches in its scene
        assert m.match(a, elsewhere).inliers >= 15, m.match(a, elsewhere)
    # the same rule in the one-vs-many coat evidence
    index = CoatIndex(f[1:4], np.array([1, 0, 0]), 2, SETTINGS)
    ev = index.evidence([f[0], f[4]]).inliers
    assert ev[:, 0].min() >= 15 and ev[:, 1].max() <= 6, ev
