"""Word boxes from a line's box and the page's ink, against words rendered at known places."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from kosmos_cli.values import BBox, Line, Word
from kosmos_cli.words import split_words

# Mean IoU of predicted against true word boxes that kosmos holds itself to on clean rendered text:
# per font, size, spacing and skew, and over every case (measured 2026-12-01: 0.986 over 925 words;
# the weakest case, Pillow's own font at 14 px, 0.906).
MIN_CASE_IOU = 0.85
MIN_MEAN_IOU = 0.95
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["default", "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]
SENTENCES = [
    "Invoice 2024-117 total: 1,250.00 EUR",
    "The quick brown fox jumps over the lazy dog.",
    "Tel. +49 (0)30 123 456 - Fax 789",
    "a b c d e f",
    "Hello, world! (draft)",
    "Kosmos-2.5 reads pages; it writes lines.",
]


def font(name: str, size: int) -> Font:
    if name == "default":
        return ImageFont.load_default(size=size)
    path = DEJAVU / name
    if not path.exists():
        pytest.skip(f"{path} is not installed (fonts-dejavu-core)")
    return ImageFont.truetype(str(path), size)


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def render(
    sentence: str, face: Font, *, spacing: float = 1.0, angle: float = 0.0
) -> tuple[Image.Image, BBox, list[BBox]]:
    """Draw a sentence word by word on white; return the page, the line's box and each word's ink box."""
    image = Image.new("L", (1400, 200), 255)
    draw = ImageDraw.Draw(image)
    x, y = 40.0, 60
    space = draw.textlength(" ", font=face) * spacing
    truth: list[BBox] = []
    for word in sentence.split():
        alone = Image.new("L", image.size, 255)
        ImageDraw.Draw(alone).text((x, y), word, font=face, fill=0)
        if angle:
            alone = alone.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255, center=(40, 60))
        box = alone.point(lambda value: 255 if value < 128 else 0).getbbox()
        assert box is not None
        truth.append(box)
        image = Image.fromarray(np.minimum(np.asarray(image), np.asarray(alone)))
        x += draw.textlength(word, font=face) + space
    left, top = min(b[0] for b in truth), min(b[1] for b in truth)
    right, bottom = max(b[2] for b in truth), max(b[3] for b in truth)
    margin = random.Random(sentence).randint(2, 8)  # the model's boxes are a little loose
    line_box = (left - margin, top - margin, right + margin, bottom + margin)
    return image.convert("RGB"), line_box, truth


def iou(a: BBox, b: BBox) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def line_of(box: BBox, text: str) -> Line:
    x0, y0, x1, y1 = box
    return Line(text, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))


CASES = [
    (name, size, spacing, angle)
    for name in FONTS
    for size, spacing, angle in (
        (14, 1.0, 0.0),
        (24, 1.0, 0.0),
        (40, 1.0, 0.0),
        (24, 2.5, 0.0),
        (24, 1.0, 1.5),
    )
]


def case_scores(name: str, size: int, spacing: float, angle: float) -> list[float]:
    """IoU of each predicted word box with its true box, over every sentence in one case."""
    face = font(name, size)
    scores = []
    for sentence in SENTENCES:
        image, box, truth = render(sentence, face, spacing=spacing, angle=angle)
        words = split_words(image, line_of(box, sentence))
        assert [word.text for word in words] == sentence.split()
        scores += [iou(word.bbox, true) for word, true in zip(words, truth, strict=True)]
    return scores


@pytest.mark.parametrize(
    ("name", "size", "spacing", "angle"), [pytest.param(*case, id="-".join(map(str, case))) for case in CASES]
)
def test_word_boxes_land_on_the_words(name: str, size: int, spacing: float, angle: float) -> None:
    scores = case_scores(name, size, spacing, angle)
    assert sum(scores) / len(scores) >= MIN_CASE_IOU


def test_word_boxes_over_every_case() -> None:
    if not DEJAVU.exists():
        pytest.skip("the DejaVu fonts are not installed (fonts-dejavu-core)")
    scores = [score for case in CASES for score in case_scores(*case)]
    assert sum(scores) / len(scores) >= MIN_MEAN_IOU


def test_glyphs_without_gaps_are_split_by_their_characters() -> None:
    image = Image.new("RGB", (300, 40), "white")
    ImageDraw.Draw(image).rectangle((10, 10, 290, 30), fill="black")  # ink from end to end, no gap
    words = split_words(image, line_of((5, 5, 295, 35), "ab cdef"))
    assert [word.text for word in words] == ["ab", "cdef"]
    assert [word.bbox for word in words] == [
        (10, 10, 90, 31),
        (130, 10, 291, 31),
    ]  # 2 + 1 + 4 characters of 280 px


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (Line("no box here", None), ()),
        (
            line_of((10, 10, 60, 30), "blank box"),
            (Word("blank", (10, 10, 60, 30)), Word("box", (10, 10, 60, 30))),
        ),
    ],
)
def test_lines_the_image_cannot_split(line: Line, expected: tuple[Word, ...]) -> None:
    assert split_words(Image.new("RGB", (100, 50), "white"), line) == expected


def test_words_of_a_shrunk_image_are_in_page_pixels() -> None:
    face = font("default", 40)
    image, box, truth = render("two words", face)
    half = image.resize((image.width // 2, image.height // 2))
    words = split_words(half, line_of(box, "two words"), scale=(0.5, 0.5))
    assert all(iou(word.bbox, true) > 0.8 for word, true in zip(words, truth, strict=True))
