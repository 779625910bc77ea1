"""Build test inputs on disk: images of every mode and format, PDFs of known geometry, broken files.

Every builder is keyword-only after the path, writes one file and returns its path. Images show
`sample_image`: four solid quadrants (`QUADRANTS`), so orientation, palette, depth and transparency
handling can be checked pixel by pixel with `quadrant_points`. PDF geometry is given in PDF user
space (points, origin bottom-left, y up), the space the content stream itself uses.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pymupdf
from PIL import Image

BLACK = (0, 0, 0)
RED = (255, 0, 0)
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)
QUADRANTS = (BLACK, RED, GREEN, WHITE)  # top-left, top-right, bottom-left, bottom-right
DEFAULT_SIZE = (96, 64)  # width, height: not square, so a wrong rotation changes the size
BOMB_SIZE = (20_000, 20_000)  # 400 megapixels: above PIL's decompression-bomb error limit

# For EXIF orientation N, the transpose that turns the upright picture into what the file stores
# (the inverse of what a viewer applies to show it upright).
_STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sample_image(*, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """Return the RGB test picture: black | red over green | white."""
    width, height = size
    image = Image.new("RGB", size, WHITE)
    half_w, half_h = width // 2, height // 2
    image.paste(BLACK, (0, 0, half_w, half_h))
    image.paste(RED, (half_w, 0, width, half_h))
    image.paste(GREEN, (0, half_h, half_w, height))
    return image


def quadrant_points(*, size: tuple[int, int] = DEFAULT_SIZE) -> tuple[tuple[int, int], ...]:
    """Return the centre of each quadrant of `sample_image`, in `QUADRANTS` order."""
    width, height = size
    xs, ys = (width // 4, 3 * width // 4), (height // 4, 3 * height // 4)
    return ((xs[0], ys[0]), (xs[1], ys[0]), (xs[0], ys[1]), (xs[1], ys[1]))


def make_image(
    path: Path,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    mode: str = "RGB",
    fmt: str = "PNG",
    orientation: int = 1,
    transparent: bool = False,
) -> Path:
    """Write `sample_image` in a PIL mode and format, stored so that EXIF `orientation` shows it upright.

    Modes: RGB, L, 1, P, RGBA, LA, I;16, I, CMYK, and RGB;16 (a 16-bit RGB PNG, written by hand as PIL
    cannot). RGBA and LA make the bottom-right quadrant transparent black, and so does P with
    `transparent=True`: correct flattening shows it white, a plain conversion black. 16-bit and
    32-bit modes hold each 8-bit value v as v * 257, so scaling back gives v exactly.
    `fmt` is the file's real format, whatever `path`'s suffix says, so misnamed files are easy.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    upright = sample_image(size=size)
    stored = upright.transpose(_STORED_AS[orientation]) if orientation != 1 else upright
    if mode == "RGB;16":
        if fmt != "PNG" or orientation != 1:
            raise ValueError("RGB;16 is written as a plain PNG only")
        path.write_bytes(_png_rgb16(stored))
        return path
    image = _in_mode(stored, mode, transparent=transparent)
    options: dict[str, object] = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    if fmt == "WEBP":
        options["lossless"] = True
    if "transparency" in image.info:
        options["transparency"] = image.info["transparency"]
    image.save(path, format=fmt, **options)
    return path


def make_tiff(
    path: Path, *, sizes: Sequence[tuple[int, int]] = (DEFAULT_SIZE, (64, 96), (40, 40)), mode: str = "RGB"
) -> Path:
    """Write a multi-page TIFF, one `sample_image` frame of each size."""
    frames = [_in_mode(sample_image(size=size), mode, transparent=False) for size in sizes]
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:])
    return path


def make_animation(
    path: Path, *, fmt: str = "GIF", frames: int = 3, size: tuple[int, int] = DEFAULT_SIZE
) -> Path:
    """Write an animation whose first frame is `sample_image` and whose later frames are shades of blue."""
    first = sample_image(size=size)
    later = [Image.new("RGB", size, (0, 0, 255 - 40 * index)) for index in range(frames - 1)]
    options: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    first.save(path, format=fmt, save_all=True, append_images=later, duration=100, loop=0, **options)
    return path


@dataclass(frozen=True)
class PdfPage:
    """One page for `make_pdf`; every coordinate is PDF user space in points (origin bottom-left, y up)."""

    width: float = 612.0  # MediaBox size (US Letter by default)
    height: float = 792.0
    origin: tuple[float, float] = (0.0, 0.0)  # MediaBox lower-left corner; real files sometimes move it
    rotate: int = 0  # the page's /Rotate
    cropbox: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    box: tuple[float, float, float, float] | None = None  # a filled black rectangle x0, y0, x1, y1
    text: str | None = None  # a line of Helvetica near the top-left of the unrotated page
    scan: bool = False  # cover the page with one embedded image, as a scanner's PDF does


# Mixed sizes, both landscape rotations, an offset crop box and a scanned page.
MIXED_PAGES = (
    PdfPage(text="Letter page"),
    PdfPage(width=595.0, height=842.0, text="A4 page"),
    PdfPage(rotate=90, text="Rotated 90", box=(72, 600, 300, 700)),
    PdfPage(width=420.0, height=595.0, rotate=270, text="A5 rotated 270"),
    PdfPage(cropbox=(100, 150, 500, 650), box=(150, 400, 350, 500), text="Cropped page"),
    PdfPage(scan=True),
)


def make_pdf(path: Path, *, pages: Sequence[PdfPage] = (PdfPage(),), password: str | None = None) -> Path:
    """Write a PDF with the given pages; with `password`, encrypted (AES-256) and needing it to open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = pymupdf.open()
    for spec in pages:
        _add_pdf_page(doc, spec)
    if password is None:
        doc.save(path)
    else:
        doc.save(
            path, encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner"
        )
    doc.close()
    return path


def make_empty(path: Path) -> Path:
    """Write a zero-byte file."""
    path.write_bytes(b"")
    return path


def make_text(path: Path, *, text: str = "not an image, not a PDF\n") -> Path:
    """Write a plain-text file (an unsupported input, or a misnamed one given an image suffix)."""
    path.write_text(text, encoding="utf-8")
    return path


def make_truncated(path: Path, *, fmt: str = "PNG", keep: float = 0.5) -> Path:
    """Write a valid file of `fmt` (an image format, or PDF) cut off after `keep` of its bytes."""
    data = _valid_bytes(fmt)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_corrupt(path: Path, *, fmt: str = "PNG") -> Path:
    """Write a file that starts like a valid `fmt` file (magic bytes intact) and goes on as noise."""
    head = _valid_bytes(fmt)[:16]
    path.write_bytes(head + random.Random(fmt).randbytes(4096))
    return path


def make_bomb(path: Path, *, size: tuple[int, int] = BOMB_SIZE) -> Path:
    """Write a tiny PNG whose header claims `size`: a decompression bomb as PIL sees one."""
    width, height = size
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def make_unreadable(path: Path) -> bool:
    """Remove every permission from a file; return whether this process can now no longer read it.

    Root reads regardless of permissions, so as root this returns False and tests must simulate.
    """
    path.chmod(0)
    return not os.access(path, os.R_OK)


def _in_mode(image: Image.Image, mode: str, *, transparent: bool) -> Image.Image:
    """Convert the RGB sample to a PIL mode the way real files carry it."""
    width, height = image.size
    corner = (width // 2, height // 2, width, height)
    if mode == "RGB":
        return image
    if mode == "L":
        return image.convert("L")
    if mode == "1":
        return image.convert("L").point(lambda value: 255 if value > 127 else 0, "1")
    if mode in ("I;16", "I"):
        deep = image.convert("L").convert("I").point(lambda value: value * 257)
        return deep.convert(mode) if mode == "I;16" else deep
    if mode == "CMYK":
        return image.convert("CMYK")
    if mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        rgba.paste((0, 0, 0, 0), corner)
        return rgba.convert(mode)
    if mode == "P":
        palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        if not transparent:
            return palette
        entries = palette.getpalette() or []
        hidden = len(entries) // 3  # a new black entry, used only by the transparent corner
        palette.putpalette([*entries, 0, 0, 0])
        palette.paste(hidden, corner)
        palette.info["transparency"] = hidden
        return palette
    raise ValueError(f"no test images in mode {mode}")


def _add_pdf_page(doc: pymupdf.Document, spec: PdfPage) -> None:
    page = doc.new_page(width=spec.width, height=spec.height)
    x0, y0 = spec.origin
    doc.xref_set_key(page.xref, "MediaBox", f"[{x0:g} {y0:g} {x0 + spec.width:g} {y0 + spec.height:g}]")
    if spec.box is not None:
        bx0, by0, bx1, by1 = spec.box
        # Written as raw operators so the rectangle sits at exactly these user-space coordinates.
        stream = doc.get_new_xref()
        doc.update_object(stream, "<<>>")
        doc.update_stream(stream, f"q 0 0 0 rg {bx0:g} {by0:g} {bx1 - bx0:g} {by1 - by0:g} re f Q".encode())
        doc.xref_set_key(page.xref, "Contents", f"{stream} 0 R")
    if spec.scan:
        scan = sample_image(size=(int(spec.width), int(spec.height)))
        buffer = io.BytesIO()
        scan.save(buffer, format="PNG")
        page.insert_image(page.rect, stream=buffer.getvalue())
    if spec.text is not None:
        page.insert_text((36, 48), spec.text, fontsize=18)
    if spec.cropbox is not None:
        doc.xref_set_key(page.xref, "CropBox", "[{:g} {:g} {:g} {:g}]".format(*spec.cropbox))
    if spec.rotate:
        page.set_rotation(spec.rotate)


def _valid_bytes(fmt: str) -> bytes:
    """Return a complete, valid file of `fmt`, large enough that cutting it loses real content."""
    if fmt == "PDF":
        buffer = io.BytesIO()
        doc = pymupdf.open()
        for spec in MIXED_PAGES:
            _add_pdf_page(doc, spec)
        doc.save(buffer)
        doc.close()
        return buffer.getvalue()
    noise = Image.frombytes("RGB", (200, 150), random.Random(0).randbytes(200 * 150 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_rgb16(image: Image.Image) -> bytes:
    """Encode an RGB image as a 16-bit-per-channel PNG, each 8-bit value v stored as v * 257."""
    width, height = image.size
    pixels = image.tobytes()
    rows = b"".join(
        b"\x00"
        + b"".join(struct.pack(">H", value * 257) for value in pixels[y * width * 3 : (y + 1) * width * 3])
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
