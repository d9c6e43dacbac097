"""Shared pytest fixtures.

Image-folder fixtures (tests/test_data.py and anything that needs real files on disk):

* ``digits_folder`` -- ``root/<zero..nine>/NNNN.png``: 40 real 32x32 grey PNGs per class from
  scikit-learn's ``load_digits()`` (session scope, read-only).
* ``messy_folder`` -- three usable classes in mixed formats plus every kind of junk a user's
  folder can hold (see :func:`_build_messy_folder`; session scope, read-only).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS_PER_CLASS = 40


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/<digit name>/NNNN.png``: 40 per class, 10 classes, 32x32 mode-L PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for label, name in enumerate(_DIGIT_NAMES):
        (root / name).mkdir()
        indices = np.flatnonzero(digits.target == label)[:_DIGITS_PER_CLASS]
        for index in indices:
            pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR)
            image.save(root / name / f"{index:04d}.png")
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` grey pixels, a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _build_messy_folder(root: Path) -> Path:
    """Write the messy folder under ``root`` and return ``root``.

    Usable classes ``broken``, ``colour``, ``grey``; dropped classes ``all_bad`` (its only
    file is empty) and ``empty_class`` (no files). Expected skipped files and reasons::

        all_bad/zero.png        empty file
        broken/big.png          decompression bomb (100000000 pixels)    (warning tier)
        broken/bomb.png         decompression bomb (10000000000 pixels)  (error tier)
        broken/empty.jpg        empty file
        broken/text.jpg         not an image (cannot identify)
        broken/truncated.jpg    truncated/corrupt: image file is truncated ...

    Ignored silently: .DS_Store, Thumbs.db, README.txt, colour/.hidden.jpg,
    colour/.cache/inner.png, colour/notes.txt.
    Loads (``load_rgb``) to: colour/rgb.jpg 40x30, colour/cmyk.jpg 20x10,
    colour/exif_rotated.jpg stored 40x20 with EXIF orientation 6 -> 20x40,
    colour/palette_transparent.png 10x10 (pixel (0,0) green, the rest transparent -> white),
    colour/rgba.png 10x10 (left half transparent -> white, right half red),
    colour/photo.webp 12x12, colour/nested/deep.bmp 9x7, grey/grey.png 16x16 (value 77),
    grey/gradient16.png 64x16 16-bit 0..65535 left to right, grey/float.tif 64x8 float 0..1,
    grey/bilevel.png 8x8 mode 1, grey/frames.gif 8x8 animated palette.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colour, grey, broken = root / "colour", root / "grey", root / "broken"
    for folder in (colour, colour / "nested", colour / ".cache", grey, broken,
                   root / "empty_class", root / "all_bad"):
        folder.mkdir(parents=True)

    # junk that must be ignored without a word
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(64))
    (root / "Thumbs.db").write_bytes(bytes(32))
    (root / "README.txt").write_text("my photos\n")
    (colour / "notes.txt").write_text("not an image\n")
    Image.new("RGB", (5, 5)).save(colour / ".hidden.jpg")
    Image.new("RGB", (5, 5)).save(colour / ".cache" / "inner.png")
    (grey / "Thumbs.db").write_bytes(bytes(16))

    # colour: usable images in several formats and modes
    noise = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(colour / "rgb.jpg", quality=90)
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(colour / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 120, 200)).save(colour / "exif_rotated.jpg", exif=exif)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(colour / "palette_transparent.png", transparency=0)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, 5:] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(colour / "rgba.png")
    Image.fromarray(noise[:12, :12]).save(colour / "photo.webp")
    Image.new("RGB", (9, 7), (0, 0, 255)).save(colour / "nested" / "deep.bmp")

    # grey: single-channel modes
    Image.new("L", (16, 16), 77).save(grey / "grey.png")
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(grey / "gradient16.png")
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))
    Image.fromarray(ramp).save(grey / "float.tif")
    Image.new("1", (8, 8), 1).save(grey / "bilevel.png")
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    frames[0].save(grey / "frames.gif", save_all=True, append_images=frames[1:])

    # broken: one good image so the class survives, then every kind of bad file
    Image.new("RGB", (8, 8), (200, 0, 0)).save(broken / "ok.png")
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not a JPEG\n" * 20)
    jpeg_path = broken / "truncated.jpg"
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(jpeg_path, quality=95)
    data = jpeg_path.read_bytes()
    jpeg_path.write_bytes(data[: len(data) * 6 // 10])
    (broken / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (broken / "big.png").write_bytes(_png_header_only(10_000, 10_000))

    (root / "all_bad" / "zero.png").write_bytes(b"")
    return root


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of mixed formats and junk; see :func:`_build_messy_folder` for its contents."""
    return _build_messy_folder(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one intra-op thread, then restore the thread count.

    Tests made of many tiny tensor ops are several times faster that way on the 2-core CI
    machines (thread barriers dominate; measured up to 50x for batched small SVDs).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
