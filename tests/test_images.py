"""Decoding every pixel layout the data may come in, and the alpha modes' geometry."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from jaguar_kit.data.images import (
    apply_alpha_mode,
    check_image_file,
    crop_box,
    decode_image,
    mask_is_empty,
)
from jaguar_kit.errors import JaguarKitError


def _png_bytes(arr: np.ndarray, color_type: int) -> bytes:
    """A minimal PNG writer, for layouts cv2 cannot write (gray + alpha)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    depth = arr.dtype.itemsize * 8
    raw = arr.astype(arr.dtype.newbyteorder(">")).reshape(h, -1).tobytes()
    stride = len(raw) // h
    rows = b"".join(b"\x00" + raw[i * stride : (i + 1) * stride] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_rgba_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.dstack([rgb[..., ::-1], alpha]))  # cv2 writes BGRA
    out, mask = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(mask, alpha)


def test_rgb_png_has_no_mask(tmp_path: Path) -> None:
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    out, mask = decode_image(tmp_path / "a.png")
    assert mask is None
    assert out[0, 0].tolist() == [200, 0, 0]


def test_grayscale_8_and_16_bit(tmp_path: Path) -> None:
    g8 = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    cv2.imwrite(str(tmp_path / "g8.png"), g8)
    out, mask = decode_image(tmp_path / "g8.png")
    assert mask is None and out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g8)

    g16 = np.array([[0, 257, 1000], [32768, 65280, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out, mask = decode_image(tmp_path / "g16.png")
    expected = np.round(g16 / 257.0).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    assert out.dtype == np.uint8 and mask is None
    np.testing.assert_array_equal(out[..., 1], expected)


def test_16_bit_rgba(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 4), np.uint16)
    img[..., 2] = 65535  # red in BGRA
    img[..., 3] = 32896  # alpha 128 after scaling
    cv2.imwrite(str(tmp_path / "a.png"), img)
    out, mask = decode_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert mask.dtype == np.uint8 and int(mask[0, 0]) == 128


def test_gray_plus_alpha(tmp_path: Path) -> None:
    ga = np.zeros((3, 4, 2), np.uint8)
    ga[..., 0] = 90
    ga[1:, :, 1] = 255
    (tmp_path / "ga.png").write_bytes(_png_bytes(ga, color_type=4))
    out, mask = decode_image(tmp_path / "ga.png")
    assert out.shape == (3, 4, 3) and (out == 90).all()
    np.testing.assert_array_equal(mask, ga[..., 1])


def test_jpeg_accepted_without_mask(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 220  # blue
    cv2.imwrite(str(tmp_path / "cam.jpg"), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    out, mask = decode_image(tmp_path / "cam.jpg")
    assert mask is None and out.shape == (16, 16, 3)
    assert abs(int(out[8, 8, 2]) - 220) <= 3 and int(out[8, 8, 0]) <= 3


def test_broken_files_raise_naming_the_file(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((50, 50, 4), np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-20])
    (tmp_path / "zero.png").write_bytes(b"")
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "photo.png").write_bytes(buf.tobytes())
    cases = {"cut.png": "truncated PNG", "zero.png": "zero-byte", "photo.png": "rename it to photo.jpg"}
    for name, words in cases.items():
        with pytest.raises(JaguarKitError) as e:
            decode_image(tmp_path / name)
        assert name in str(e.value) and words in str(e.value)
        assert words in check_image_file(tmp_path / name)
    assert check_image_file(tmp_path / "ok.png") is None


def test_truncated_jpeg_detected(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(JaguarKitError, match="cut.jpg: truncated JPEG"):
        decode_image(tmp_path / "cut.jpg")


# --- alpha modes ------------------------------------------------------------------------


def _scene() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.random.default_rng(1).integers(1, 256, (80, 100, 3), dtype=np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    mask[10:30, 20:40] = 255  # box x 20..40, y 10..30 (20 x 20)
    return rgb, mask


def test_crop_to_box_plus_margin() -> None:
    rgb, mask = _scene()
    out = apply_alpha_mode(rgb, mask, "crop", margin=0.1)  # 2 px each side
    assert crop_box(mask, 0.1) == (18, 8, 42, 32)
    np.testing.assert_array_equal(out, rgb[8:32, 18:42])
    np.testing.assert_array_equal(apply_alpha_mode(rgb, mask, "crop", margin=0.0), rgb[10:30, 20:40])


def test_crop_margin_clipped_to_image() -> None:
    rgb, mask = _scene()
    mask[:] = 0
    mask[0:40, 90:100] = 255  # touches the top and right edges
    out = apply_alpha_mode(rgb, mask, "crop", margin=0.5)  # 5 px x, 20 px y
    np.testing.assert_array_equal(out, rgb[0:60, 85:100])


def test_soft_alpha_threshold() -> None:
    rgb, mask = _scene()
    mask[50:60, 50:60] = 100  # faint halo, not the animal
    np.testing.assert_array_equal(apply_alpha_mode(rgb, mask, "crop", margin=0.0), rgb[10:30, 20:40])


def test_blank_zeroes_background_only() -> None:
    rgb, mask = _scene()
    out = apply_alpha_mode(rgb, mask, "blank")
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out[10:30, 20:40], rgb[10:30, 20:40])
    outside = mask < 128
    assert (out[outside] == 0).all()


def test_ignore_and_no_mask_unchanged() -> None:
    rgb, mask = _scene()
    assert apply_alpha_mode(rgb, mask, "ignore") is rgb
    for mode in ("crop", "blank", "ignore"):
        assert apply_alpha_mode(rgb, None, mode) is rgb


def test_empty_mask_keeps_full_image_and_is_flagged() -> None:
    rgb, mask = _scene()
    empty = np.zeros_like(mask)
    assert mask_is_empty(empty) and not mask_is_empty(mask) and not mask_is_empty(None)
    for mode in ("crop", "blank", "ignore"):
        np.testing.assert_array_equal(apply_alpha_mode(rgb, empty, mode), rgb)


def test_unknown_mode_rejected() -> None:
    rgb, mask = _scene()
    with pytest.raises(JaguarKitError, match="data.alpha_mode='cut': expected one of crop, blank, ignore"):
        apply_alpha_mode(rgb, mask, "cut")
