"""modelkiln.images: every input becomes an RGB image or a one-line InputError."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelkiln.errors import InputError
from modelkiln.images import DEFAULT_MAX_PIXELS, load_image, load_images


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _save(tmp_path: Path, image: Image.Image, name: str = "image.png") -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def _png_with_size(tmp_path: Path, width: int, height: int) -> Path:
    """A 4×4 PNG whose IHDR claims width×height: Image.open sees the claimed size."""
    path = _save(tmp_path, Image.new("L", (4, 4), 7), "huge.png")
    data = bytearray(path.read_bytes())
    # Signature (8) + chunk length (4) + b"IHDR" (4), then width and height, big-endian.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def _assert_one_line(error: pytest.ExceptionInfo[InputError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- file errors -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no such image file: '.*nope\.png'") as error:
        load_image(tmp_path / "nope.png")
    _assert_one_line(error)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory") as error:
        load_image(str(tmp_path))
    assert str(tmp_path) in _assert_one_line(error)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(InputError, match=r"'.*notes\.txt' is not an image file Pillow can read"):
        load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(noise), "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as error:
        load_image(path)
    assert "cut.png" in _assert_one_line(error)


def test_file_handles_are_closed(tmp_path: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to count open files")
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = _save(tmp_path, Image.fromarray(noise))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:500])
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        load_image(good)
        with pytest.raises(InputError):
            load_image(bad)
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_over_max_pixels_is_checked_from_the_header(tmp_path: Path) -> None:
    path = _save(tmp_path, Image.new("RGB", (4, 4)))
    with pytest.raises(InputError) as error:
        load_image(path, max_pixels=10)
    message = _assert_one_line(error)
    assert "image.png" in message
    assert "4×4" in message
    assert "4×4 (16 pixels), over the limit of 10 pixels" in message
    assert "--max-pixels" in message
    assert load_image(path, max_pixels=None).size == (4, 4)
    assert load_image(path, max_pixels=16).size == (4, 4)


def test_huge_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _png_with_size(tmp_path, 12_000, 10_000)  # 120 MP: Pillow only warns, we refuse.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError) as error:
            load_image(path)
    message = _assert_one_line(error)
    assert "12000×10000 (120.0 MP), over the limit of 100.0 MP" in message
    assert "raise max_pixels (kiln: --max-pixels)" in message
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_decompression_bomb_is_translated(tmp_path: Path) -> None:
    path = _png_with_size(tmp_path, 20_000, 20_000)  # 400 MP: Pillow itself refuses.
    with pytest.raises(InputError) as error:
        load_image(path)
    message = _assert_one_line(error)
    assert "400.0 MP, over the limit of 100.0 MP" in message
    with pytest.raises(InputError, match=r"decompression-bomb limit.*MAX_IMAGE_PIXELS"):
        load_image(path, max_pixels=None)


def test_decompression_bomb_with_a_lowered_pillow_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, Image.new("RGB", (4, 4)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5)  # Pillow raises above 2 × 5 pixels.
    with pytest.raises(
        InputError,
        match=r"image '.*image\.png' has 16 pixels, over Pillow's decompression-bomb limit of 10 pixels",
    ):
        load_image(path, max_pixels=None)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90° clockwise to display.
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


# --- modes -------------------------------------------------------------------------------


def test_rgb_file_round_trips(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(pixels))
    np.testing.assert_array_equal(_rgb(load_image(path)), pixels)
    np.testing.assert_array_equal(_rgb(load_image(str(path))), pixels)


def test_grayscale_png_is_replicated(tmp_path: Path) -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = _rgb(load_image(_save(tmp_path, Image.fromarray(gray))))
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    image = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    np.testing.assert_array_equal(_rgb(load_image(_save(tmp_path, image)))[0, 0], [10, 20, 30])


def test_palette_png_is_expanded(tmp_path: Path) -> None:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 250, 128, 3] + [0] * 762)
    np.testing.assert_array_equal(_rgb(load_image(_save(tmp_path, image)))[1, 1], [250, 128, 3])


def test_sixteen_bit_png_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = _rgb(load_image(_save(tmp_path, image)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


@pytest.mark.parametrize(("mode", "dtype"), [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_sixteen_bit_modes(mode: str, dtype: str) -> None:
    values = np.array([[0, 32896, 65535]], dtype=dtype)
    image = Image.frombytes(mode, (3, 1), values.tobytes())
    np.testing.assert_array_equal(_rgb(load_image(image))[0, :, 1], [0, 128, 255])


def test_int32_mode() -> None:
    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(_rgb(load_image(wide))[0, :, 0], [0, 128, 255])
    narrow = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    np.testing.assert_array_equal(_rgb(load_image(narrow))[0, :, 0], [0, 7, 255])


def test_float_mode() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(_rgb(load_image(unit))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-3.0, 12.4, 300.0]], dtype=np.float32))
    np.testing.assert_array_equal(_rgb(load_image(wide))[0, :, 0], [0, 12, 255])


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("1", 1, [255, 255, 255]),
        ("L", 77, [77, 77, 77]),
        ("LA", (77, 0), [77, 77, 77]),
        ("RGB", (1, 2, 3), [1, 2, 3]),
        ("RGBA", (1, 2, 3, 4), [1, 2, 3]),
        ("CMYK", (0, 0, 0, 0), [255, 255, 255]),
        ("YCbCr", (255, 128, 128), [255, 255, 255]),
    ],
)
def test_pil_modes(mode: str, color: object, expected: list[int]) -> None:
    image = Image.new(mode, (3, 2), color)  # type: ignore[arg-type]
    np.testing.assert_array_equal(_rgb(load_image(image))[1, 2], expected)


def test_pa_mode() -> None:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pa = image.convert("PA")
    assert pa.mode == "PA"
    np.testing.assert_array_equal(_rgb(load_image(pa))[0, 0], [9, 8, 7])


def test_pil_input_is_not_mutated() -> None:
    image = Image.new("RGBA", (4, 3), (5, 6, 7, 8))
    before = image.tobytes()
    out = load_image(image)
    assert image.mode == "RGBA"
    assert image.tobytes() == before
    rgb = Image.new("RGB", (4, 3), (5, 6, 7))
    same_mode = load_image(rgb)
    assert same_mode is not rgb
    same_mode.putpixel((0, 0), (0, 0, 0))
    assert rgb.getpixel((0, 0)) == (5, 6, 7)
    assert out.mode == "RGB"


def test_empty_pil_image() -> None:
    with pytest.raises(InputError, match="empty"):
        load_image(Image.new("RGB", (0, 3)))


# --- arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.full((2, 3), 40, dtype=np.uint8),
        np.full((2, 3, 1), 40, dtype=np.uint8),
        np.full((2, 3), 40 * 257, dtype=np.uint16),
        np.full((2, 3), 40 * 257, dtype=">u2"),
        np.full((2, 3), 40 / 255, dtype=np.float16),
        np.full((2, 3), 40 / 255, dtype=np.float32),
        np.full((2, 3, 1), 40 / 255, dtype=np.float64),
    ],
    ids=["HW-u8", "HW1-u8", "HW-u16", "HW-u16be", "HW-f16", "HW-f32", "HW1-f64"],
)
def test_grayscale_arrays(array: np.ndarray) -> None:
    out = _rgb(load_image(array))
    assert out.shape == (2, 3, 3)
    assert (out == 40).all()


def test_rgb_and_rgba_arrays() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(load_image(pixels)), pixels)
    rgba = np.concatenate([pixels, np.zeros((4, 5, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(_rgb(load_image(rgba)), pixels)
    floats = pixels.astype(np.float32) / 255
    np.testing.assert_array_equal(_rgb(load_image(floats)), pixels)
    wide = pixels.astype(np.uint16) * 257
    np.testing.assert_array_equal(_rgb(load_image(wide)), pixels)
    strided = np.asfortranarray(pixels)[:, ::-1]
    np.testing.assert_array_equal(_rgb(load_image(strided)), pixels[:, ::-1])


def test_bool_array() -> None:
    out = _rgb(load_image(np.array([[True, False]])))
    np.testing.assert_array_equal(out[0, :, 0], [255, 0])


def test_sixteen_bit_array_rounds() -> None:
    out = _rgb(load_image(np.array([[65535, 32896, 1000, 128]], dtype=np.uint16)))
    np.testing.assert_array_equal(out[0, :, 0], [255, 128, 4, 0])


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((3, 32, 32), np.uint8), r"shape \(3, 32, 32\).*channels-first.*transpose"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\).*batch"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\).*HxWxC with C = 1, 3 or 4"),
        (np.zeros(8, np.uint8), r"shape \(8,\)"),
        (np.zeros((8, 8), np.int64), "dtype int64 is not supported.*uint8"),
        (np.zeros((8, 8, 3), np.complex64), "dtype complex64"),
        (np.zeros((0, 8, 3), np.uint8), r"shape \(0, 8, 3\) is empty"),
        (
            np.array([[0.0, 2.0]], np.float32),
            r"values in \[0, 2\], outside \[0, 1\].*divide by 255",
        ),
        (np.full((2, 2), -0.5, np.float64), r"outside \[0, 1\].*uint8"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
    ],
)
def test_rejected_arrays(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as error:
        load_image(array)
    _assert_one_line(error)


@pytest.mark.parametrize(("value", "name"), [(3, "int"), (b"\x89PNG", "bytes"), (None, "NoneType")])
def test_other_types(value: object, name: str) -> None:
    with pytest.raises(InputError, match=f"from a {name}; pass a file path"):
        load_image(value)  # type: ignore[arg-type]


# --- load_images -------------------------------------------------------------------------


def test_load_images_mixed(tmp_path: Path) -> None:
    path = _save(tmp_path, Image.new("L", (3, 3), 9))
    images = load_images([path, Image.new("RGB", (2, 2)), np.zeros((4, 4), np.uint8)])
    assert [image.size for image in images] == [(3, 3), (2, 2), (4, 4)]
    assert all(image.mode == "RGB" for image in images)
    assert load_images(iter([str(path)]))[0].size == (3, 3)


def test_load_images_batch_array() -> None:
    batch = np.zeros((3, 4, 5, 3), np.uint8)
    assert [image.size for image in load_images(batch)] == [(5, 4)] * 3
    with pytest.raises(InputError, match=r"shape \(4, 5, 3\).*call load_image"):
        load_images(batch[0])


def test_load_images_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"images\[1\]: image array of dtype int64"):
        load_images([np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.int64)])
    with pytest.raises(InputError, match=r"^no such image file"):
        load_images([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="single str; wrap it in a list"):
        load_images("cat.png")  # type: ignore[arg-type]
    assert load_images([]) == []
