"""Parsing of raw model output: OCR lines and boxes, markdown tidying, the txt format, PDF boxes."""

from __future__ import annotations

import math
import re

import pytest

from kosmos_cli.parsing import end_cleanly, parse_ocr, tidy_markdown
from kosmos_cli.values import Line, Point
from kosmos_cli.writers.data import pixel_bbox_to_pdf
from kosmos_cli.writers.text import format_ocr_lines

# Real raw outputs for receipt_00008.png, published in huggingface/transformers
# tests/models/kosmos2_5/test_modeling_kosmos2_5.py (Kosmos2_5ModelIntegrationTest).
RECEIPT_OCR_T4 = (
    "<bbox><x_53><y_573><x_69><y_606></bbox>1\n"
    "<bbox><x_79><y_573><x_464><y_611></bbox>[REG] BLACK SAKURA\n"
    "<bbox><x_690><y_569><x_810><y_606></bbox>45,455\n"
    "<bbox><x_53><y_614><x_69><y_648></bbox>1\n"
    "<bbox><x_79><y_614><x_468><y_651></bbox>COOKIE DOH SAUCES\n"
    "<bbox><x_788><y_609><x_812><y_642></bbox>0\n"
    "<bbox><x_50><y_658><x_69><y_693></bbox>1\n"
    "<bbox><x_79><y_658><x_358><y_693></bbox>NATA DE COCO\n"
    "<bbox><x_790><y_652><x_814><y_683></bbox>0\n"
    "<bbox><x_31><y_742><x_820><y_781></bbox>Sub Total 45,455\n"
    "<bbox><x_27><y_781><x_822><y_827></bbox>PB1 (10%) 4,545\n"
    "<bbox><x_27><y_826><x_824><y_872></bbox>Rounding 0\n"
    "<bbox><x_24><y_872><x_827><y_921></bbox>Total 50,000\n"
    "<bbox><x_17><y_1056><x_836><y_1108></bbox>Card Payment 50,000\n"
)
RECEIPT_OCR_A10 = (
    "<bbox><x_53><y_573><x_69><y_606></bbox>1\n"
    "<bbox><x_79><y_573><x_464><y_611></bbox>[REG] BLACK SAKURA\n"
    "<bbox><x_690><y_569><x_810><y_606></bbox>45,455\n"
    "<bbox><x_53><y_614><x_69><y_648></bbox>1\n"
    "<bbox><x_79><y_614><x_468><y_650></bbox>COOKIE DOH SAUCES\n"
    "<bbox><x_788><y_609><x_812><y_644></bbox>0\n"
    "<bbox><x_50><y_658><x_69><y_693></bbox>1\n"
    "<bbox><x_79><y_658><x_358><y_693></bbox>NATA DE COCO\n"
    "<bbox><x_790><y_652><x_814><y_687></bbox>0\n"
    "<bbox><x_31><y_742><x_820><y_781></bbox>Sub Total 45,455\n"
    "<bbox><x_27><y_781><x_822><y_827></bbox>PB1 (10%) 4,545\n"
    "<bbox><x_27><y_826><x_824><y_872></bbox>Rounding 0\n"
    "<bbox><x_24><y_872><x_827><y_921></bbox>Total 50,000\n"
    "<bbox><x_17><y_1056><x_836><y_1108></bbox>Card Payment 50,000\n"
)
RECEIPT_OCR_FA2 = (
    "<bbox><x_53><y_573><x_69><y_606></bbox>1\n"
    "<bbox><x_79><y_573><x_464><y_612></bbox>[REG] BLACK SAKURA\n"
    "<bbox><x_690><y_569><x_812><y_606></bbox>45,455\n"
    "<bbox><x_53><y_614><x_69><y_650></bbox>1\n"
    "<bbox><x_79><y_614><x_468><y_650></bbox>COOKIE DOH SAUCES\n"
    "<bbox><x_788><y_610><x_813><y_644></bbox>0\n"
    "<bbox><x_50><y_658><x_65><y_693></bbox>1\n"
    "<bbox><x_76><y_658><x_358><y_693></bbox>NATA DE COCO\n"
    "<bbox><x_790><y_652><x_815><y_687></bbox>0\n"
    "<bbox><x_31><y_742><x_822><y_781></bbox>Sub Total 45,455\n"
    "<bbox><x_27><y_780><x_822><y_827></bbox>PB1 (10%) 4,545\n"
    "<bbox><x_27><y_826><x_824><y_874></bbox>Rounding 0\n"
    "<bbox><x_24><y_872><x_827><y_921></bbox>Total 50,000\n"
    "<bbox><x_17><y_1056><x_835><y_1108></bbox>Card Payment 50,000\n"
)
RECEIPT_MD = (
    "- **1 \\[REG\\] BLACK SAKURA** 45,455\n- **1 COOKIE DOH SAUCES** 0\n- **1 NATA DE COCO** 0\n"
    "- **Sub Total** 45,455\n- **PB1 (10%)** 4,545\n- **Rounding** 0\n- **Total** **50,000**\n\n"
    "Card Payment 50,000"
)
RECEIPT_MD_FA2_TABLE = (
    "- **1 \\[REG\\] BLACK SAKURA** 45,455\n- **1 COOKIE DOH SAUCES** 0\n- **1 NATA DE COCO** 0\n\n"
    "<table>\n<thead>\n<tr>\n<th>\nSub Total\n</th>\n<th>\n45,455\n</th>\n</tr>\n</thead>\n<tbody>\n"
    "<tr>\n<td>\nPB1 (10%)\n</td>\n<td>\n4,545\n</td>\n</tr>\n<tr>\n<td>\nRounding\n</td>\n<td>\n0\n</td>\n"
    "</tr>\n<tr>\n<td>\n<strong>\nTotal\n</strong>\n</td>\n<td>\n<strong>\n50,000\n</strong>\n</td>\n</tr>\n"
    "</tbody>\n</table>\n\nCard Payment 50,000"
)
RECEIPT_MD_FA2_LIST = (
    "- **1 \\[REG\\] BLACK SAKURA** 45,455\n- **1 COOKIE DOH SAUCES** 0\n- **1 NATA DE COCO** 0\n"
    "- **Sub Total** 45,455\n- **PB1 (10%)** 4,545\n- **Rounding** 0\n- **Total** **50,000**\n"
)
# The receipt's processor grid is 52 columns (the output reaches x_836 past 52 * 16 = 832), so at most
# 78 rows: the model saw it at 832x1248. The original sizes below are chosen for the tests.
RECEIPT_RESIZED = (832, 1248)


def box(x0: int, y0: int, x1: int, y1: int) -> tuple[Point, Point, Point, Point]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


ONE_TO_ONE = {"resized_size": (100, 100), "original_size": (100, 100)}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("", [], id="empty"),
        pytest.param(" \n\t\n", [], id="whitespace-only"),
        pytest.param("just text", [Line("just text", None)], id="no-box-at-all"),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>hello\n",
            [Line("hello", box(10, 20, 30, 40))],
            id="one-line",
        ),
        pytest.param(
            "header\n<bbox><x_10><y_20><x_30><y_40></bbox>hello",
            [Line("header", None), Line("hello", box(10, 20, 30, 40))],
            id="text-before-first-box",
        ),
        pytest.param(
            "<bbox><x_1><y_2><x_3><y_4></bbox>\n<bbox><x_10><y_20><x_30><y_40></bbox>b",
            [Line("b", box(10, 20, 30, 40))],
            id="box-without-text-skipped",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>a\n<bbox><x_12><y_3",
            [Line("a", box(10, 20, 30, 40))],
            id="cut-inside-a-token",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>a\n<bbox><x_12><y_3><x_4",
            [Line("a", box(10, 20, 30, 40))],
            id="cut-inside-the-box",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>a\n<bbox><x_1><y_50><x_90><y_60></bbox>Tot",
            [Line("a", box(10, 20, 30, 40)), Line("Tot", box(1, 50, 90, 60))],
            id="last-line-cut-by-token-limit",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>a\n<bbox><x_1><y_50><x_90><y_60></",
            [Line("a", box(10, 20, 30, 40))],
            id="cut-inside-closing-tag",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40>no closing tag\n",
            [Line("no closing tag", box(10, 20, 30, 40))],
            id="closing-tag-missing",
        ),
        pytest.param(
            "<x_10><y_20><x_30><y_40></bbox>no opening tag",
            [Line("no opening tag", box(10, 20, 30, 40))],
            id="opening-tag-missing",
        ),
        pytest.param(
            "<bbox><x_12><y_3><x_40></bbox>partial box",
            [Line("partial box", None)],
            id="unparsable-box-keeps-text",
        ),
        pytest.param(
            "<bbox><x_30><y_20><x_30><y_40></bbox>flat x\n<bbox><x_40><y_20><x_30><y_40></bbox>reversed x\n"
            "<bbox><x_10><y_40><x_30><y_40></bbox>flat y\n<bbox><x_10><y_50><x_30><y_40></bbox>reversed y",
            [Line("flat x", None), Line("reversed x", None), Line("flat y", None), Line("reversed y", None)],
            id="degenerate-boxes-keep-text",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>Größe 漢字 Ωμέγα 🙂\n",
            [Line("Größe 漢字 Ωμέγα 🙂", box(10, 20, 30, 40))],
            id="unicode",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>  a \t b\u3000c \n\n\n",
            [Line("a b c", box(10, 20, 30, 40))],
            id="extra-whitespace",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>two\nrows",
            [Line("two rows", box(10, 20, 30, 40))],
            id="newline-inside-text",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>a<x_5>b</bbox>",
            [Line("a b", box(10, 20, 30, 40))],
            id="stray-tokens-dropped",
        ),
        pytest.param(
            "<bbox><x_90><y_95><x_150><y_120></bbox>past the edge",
            [Line("past the edge", box(90, 95, 100, 100))],
            id="clipped-to-image",
        ),
        pytest.param(
            "<bbox><x_100><y_10><x_120><y_20></bbox>outside",
            [Line("outside", None)],
            id="collapses-when-clipped",
        ),
        pytest.param(
            "a < b <bbox><x_10><y_20><x_30><y_40></bbox>x <\n",
            [Line("a < b", None), Line("x <", box(10, 20, 30, 40))],
            id="lone-angle-brackets-are-text",
        ),
    ],
)
def test_parse_ocr(raw: str, expected: list[Line]) -> None:
    assert parse_ocr(raw, **ONE_TO_ONE) == expected


@pytest.mark.parametrize(
    ("raw", "resized", "original", "expected"),
    [
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>t",
            (100, 100),
            (200, 300),
            box(20, 60, 60, 120),
            id="scale-up",
        ),
        pytest.param(
            "<bbox><x_10><y_20><x_30><y_40></bbox>t", (100, 100), (50, 25), box(5, 5, 15, 10), id="scale-down"
        ),
        # The reference truncates: 1 / 4 * 2 = 0.5 -> 0 and 3 / 4 * 2 = 1.5 -> 1.
        pytest.param("<bbox><x_1><y_1><x_3><y_3></bbox>t", (4, 4), (2, 2), box(0, 0, 1, 1), id="truncated"),
        pytest.param(
            "<bbox><x_10><y_10><x_11><y_20></bbox>t", (1000, 1000), (10, 10), None, id="rounds-to-nothing"
        ),
        pytest.param(
            "<bbox><x_1><y_1><x_2><y_2></bbox>t", (3, 3), (1000, 1000), box(333, 333, 666, 666), id="thirds"
        ),
    ],
)
def test_parse_ocr_rescales(
    raw: str,
    resized: tuple[int, int],
    original: tuple[int, int],
    expected: tuple[Point, Point, Point, Point] | None,
) -> None:
    assert parse_ocr(raw, resized_size=resized, original_size=original) == [Line("t", expected)]


@pytest.mark.parametrize(
    ("resized", "original"), [((0, 10), (10, 10)), ((10, 10), (10, -1)), ((10, 10), (0, 0))]
)
def test_parse_ocr_rejects_empty_sizes(resized: tuple[int, int], original: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_ocr("", resized_size=resized, original_size=original)


def test_receipt_lines_exact() -> None:
    lines = parse_ocr(RECEIPT_OCR_T4, resized_size=RECEIPT_RESIZED, original_size=(1664, 2496))
    assert [line.text for line in lines] == [
        "1",
        "[REG] BLACK SAKURA",
        "45,455",
        "1",
        "COOKIE DOH SAUCES",
        "0",
        "1",
        "NATA DE COCO",
        "0",
        "Sub Total 45,455",
        "PB1 (10%) 4,545",
        "Rounding 0",
        "Total 50,000",
        "Card Payment 50,000",
    ]
    assert lines[0].polygon == box(106, 1146, 138, 1212)
    assert lines[0].bbox == (106, 1146, 138, 1212)
    assert lines[1].polygon == box(158, 1146, 928, 1222)
    # x_836 lies past the resized width 832: clipped to the original width.
    assert lines[-1].polygon == box(34, 2112, 1664, 2216)


def model_card_post_process(
    raw: str, scale_width: float, scale_height: float
) -> list[tuple[str, list[float]]]:
    """Re-implement the HF model card's `ocr.py` post-processing, keeping coordinates unrounded."""
    pattern = r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>"
    boxes = [[int(n) for n in re.findall(r"\d+", found)] for found in re.findall(pattern, raw)]
    texts = re.split(pattern, raw)[1:]
    kept = []
    for (x0, y0, x1, y1), text in zip(boxes, texts, strict=True):
        if x0 >= x1 or y0 >= y1:
            continue
        kept.append((text, [x0 * scale_width, y0 * scale_height, x1 * scale_width, y1 * scale_height]))
    return kept


def unilm_ocr_boxes(
    raw: str, resized: tuple[int, int], original: tuple[int, int]
) -> list[tuple[str, tuple[int, ...]]]:
    """Re-implement microsoft/unilm kosmos-2.5/inference.py `get_ocr_res`: the reference's rule."""
    width, height = resized
    raw_width, raw_height = original
    results = []
    for line in raw.split("</s>")[0].split("\n"):
        match = re.match(r"<bbox><x_(\d+)><y_(\d+)><x_(\d+)><y_(\d+)></bbox>(.*)", line)
        if match is None or not match[5].strip():
            continue
        x0, y0, x1, y1 = (int(match[i]) for i in range(1, 5))
        x0 = min(max(int(min(max(x0 / width, 0), 1) * raw_width), 0), raw_width)
        y0 = min(max(int(min(max(y0 / height, 0), 1) * raw_height), 0), raw_height)
        x1 = min(max(int(min(max(x1 / width, 0), 1) * raw_width), 0), raw_width)
        y1 = min(max(int(min(max(y1 / height, 0), 1) * raw_height), 0), raw_height)
        results.append((match[5], (x0, y0, x1, y1)))
    return results


@pytest.mark.parametrize("raw", [RECEIPT_OCR_T4, RECEIPT_OCR_A10, RECEIPT_OCR_FA2], ids=["t4", "a10", "fa2"])
@pytest.mark.parametrize("original", [(1000, 1500), (640, 961), (2479, 3508), (831, 1117)])
def test_receipt_boxes_are_the_reference_implementations(raw: str, original: tuple[int, int]) -> None:
    reference = unilm_ocr_boxes(raw, RECEIPT_RESIZED, original)
    lines = parse_ocr(raw, resized_size=RECEIPT_RESIZED, original_size=original)
    assert len(lines) == len(reference) == 14
    assert [(line.text, line.bbox) for line in lines] == [(text.strip(), box) for text, box in reference]


def test_degenerate_lines_dropped_by_model_card_are_kept() -> None:
    raw = "<bbox><x_10><y_20><x_30><y_40></bbox>kept\n<bbox><x_50><y_20><x_30><y_40></bbox>also kept\n"
    assert [text for text, _ in model_card_post_process(raw, 1, 1)] == ["kept\n"]
    assert parse_ocr(raw, **ONE_TO_ONE) == [Line("kept", box(10, 20, 30, 40)), Line("also kept", None)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("a<br>b", "a\nb", id="br"),
        pytest.param("<br><br>x<br><br><br>y<br>", "x\n\ny", id="br-runs"),
        pytest.param("  a  \n\t b \t", "a\nb", id="strip-lines"),
        pytest.param("a\n\n\n\nb", "a\n\nb", id="collapse-blank-lines"),
        pytest.param("a\n  \n \t\n\nb", "a\n\nb", id="whitespace-lines-collapse"),
        pytest.param("\n\n a \n\n", "a", id="strip-ends"),
        pytest.param("a\r\nb", "a\nb", id="crlf"),
        pytest.param("a   b  **c**", "a   b  **c**", id="inner-spaces-untouched"),
        pytest.param("<br/> x <BR>", "<br/> x <BR>", id="only-exact-br"),
        pytest.param(RECEIPT_MD, RECEIPT_MD, id="receipt"),
        pytest.param(RECEIPT_MD_FA2_TABLE, RECEIPT_MD_FA2_TABLE, id="receipt-table"),
        pytest.param(RECEIPT_MD_FA2_LIST, RECEIPT_MD_FA2_LIST.strip(), id="receipt-trailing-newline"),
    ],
)
def test_tidy_markdown(raw: str, expected: str) -> None:
    assert tidy_markdown(raw) == expected


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        ("# Title\n\nSome text", "# Title\n\nSome text"),
        (
            "<table><tr><td>a</td></tr><tr><td></td></tr",
            "<table><tr><td>a</td></tr><tr><td></td></tr></table>",
        ),
        ("<table><tr><td>a</td><td>b", "<table><tr><td>a</td><td>b</td></tr></table>"),
        (
            '<table>\n<tr><td colspan="2">a</td></tr>\n<tr><td cl',
            '<table>\n<tr><td colspan="2">a</td></tr>\n<tr></tr></table>',
        ),
        ("text then <", "text then"),
        ("line<br/>and <b>bold", "line<br/>and <b>bold</b>"),
        ("mail <me@example.org> and x < y", "mail <me@example.org> and x < y"),
        ("<table><tr><td>a</td></tr></table>\n| a |", "<table><tr><td>a</td></tr></table>\n| a |"),
    ],
)
def test_cut_markdown_ends_cleanly(cut: str, expected: str) -> None:
    assert end_cleanly(cut) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param([], "", id="none"),
        pytest.param([Line("a", box(1, 2, 3, 4))], "1,2,3,2,3,4,1,4,a", id="one"),
        pytest.param([Line("no box", None)], ",,,,,,,,no box", id="no-box"),
        pytest.param([Line("1,000.00", box(0, 0, 9, 9))], "0,0,9,0,9,9,0,9,1,000.00", id="commas-in-text"),
        pytest.param(
            [Line("a", box(1, 2, 3, 4)), Line("b", None), Line("ü", box(10, 20, 30, 40))],
            "1,2,3,2,3,4,1,4,a\n,,,,,,,,b\n10,20,30,20,30,40,10,40,ü",
            id="several",
        ),
    ],
)
def test_format_ocr_lines(lines: list[Line], expected: str) -> None:
    assert format_ocr_lines(lines) == expected


def test_receipt_txt_matches_model_card_format() -> None:
    lines = parse_ocr(RECEIPT_OCR_T4, resized_size=RECEIPT_RESIZED, original_size=(1664, 2496))
    first, *_ = format_ocr_lines(lines).split("\n")
    assert first == "106,1146,138,1146,138,1212,106,1212,1"


@pytest.mark.parametrize(
    ("bbox", "matrix", "expected"),
    [
        # Letter page rendered at 144 dpi, no rotation: y flips about the page height.
        pytest.param(
            (100, 200, 300, 400), (0.5, 0, 0, -0.5, 0, 792), (50.0, 592.0, 150.0, 692.0), id="upright"
        ),
        # /Rotate 90: pixel x runs down the page's y, pixel y runs along its x.
        pytest.param(
            (100, 200, 300, 400), (0, 0.5, 0.5, 0, 0, 0), (100.0, 50.0, 200.0, 150.0), id="rotated-90"
        ),
        # A crop box offset moves the origin.
        pytest.param((0, 0, 72, 72), (1, 0, 0, -1, 36, 756), (36.0, 684.0, 108.0, 756.0), id="crop-offset"),
        pytest.param((1, 1, 2, 2), (1 / 3, 0, 0, 1 / 3, 0, 0), (0.33, 0.33, 0.67, 0.67), id="rounded"),
    ],
)
def test_pixel_bbox_to_pdf(
    bbox: tuple[int, int, int, int],
    matrix: tuple[float, float, float, float, float, float],
    expected: tuple[float, float, float, float],
) -> None:
    assert pixel_bbox_to_pdf(bbox, matrix) == expected


def test_pixel_bbox_to_pdf_has_no_negative_zero() -> None:
    x0, _, x1, _ = pixel_bbox_to_pdf((0, 0, 10, 10), (-1, 0, 0, 1, 0, 0))
    assert (x0, x1) == (-10.0, 0.0)
    assert math.copysign(1, x1) == 1


RAW_TWO_LINES = "lead<bbox><x_1><y_1><x_9><y_9></bbox>first line<bbox><x_1><y_10><x_9><y_19></bbox>second"


@pytest.mark.parametrize(
    ("raw", "segments", "expected"),
    [
        pytest.param(
            RAW_TWO_LINES,
            [(0.5,), (0.9, 0.7, 0.8), (0.25, 0.75)],
            [("lead", 0.5, 0.5), ("first line", 0.8, 0.7), ("second", 0.5, 0.25)],
            id="one-group-per-line",
        ),
        pytest.param(
            RAW_TWO_LINES,
            [(0.5,), (0.9,)],
            [("lead", None, None), ("first line", None, None), ("second", None, None)],
            id="groups-do-not-split-it-so",
        ),
        pytest.param(
            RAW_TWO_LINES,
            [],
            [("lead", None, None), ("first line", None, None), ("second", None, None)],
            id="none-known",
        ),
        pytest.param(
            "<bbox><x_1><y_1><x_9><y_9></bbox><bbox><x_1><y_10><x_9><y_19></bbox>text",
            [(), (), (0.6, 0.4)],
            [("text", 0.5, 0.4)],
            id="a-line-without-text-is-dropped-with-its-group",
        ),
        pytest.param(
            "<x_1><y_1><x_9><y_9></bbox>no bbox token<bbox><x_1><y_10><x_9><y_19></bbox>next",
            [(0.9,), (0.8,)],
            [("no bbox token", None, None), ("next", None, None)],
            id="a-start-without-bbox-is-not-matched",
        ),
    ],
)
def test_line_confidences_come_from_their_own_tokens(
    raw: str, segments: list[tuple[float, ...]], expected: list[tuple[str, float | None, float | None]]
) -> None:
    lines = parse_ocr(raw, resized_size=(10, 20), original_size=(10, 20), segments=segments)
    got = [(line.text, line.confidence, line.min_confidence) for line in lines]
    assert got == [(text, pytest.approx(mean) if mean else None, low) for text, mean, low in expected]
