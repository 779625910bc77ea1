"""Draw the sample documents in `examples/`: a receipt, a prose page, a table and two PDFs.

Run `python examples/make_examples.py` to regenerate them. The output is byte-identical
from run to run on one machine: a fixed seed, no timestamps, no random PDF ids. Fonts
come from DejaVu when it is installed and from Pillow's built-in font otherwise, so the
pixels (not the words) differ between machines with and without DejaVu.

Only Pillow and PyMuPDF are needed.
"""

from __future__ import annotations

import io
import random
from decimal import Decimal
from functools import cache
from pathlib import Path

import pymupdf
from PIL import Image, ImageDraw, ImageFont

SEED = 2505  # every random choice below draws from one generator seeded with this
OUT_DIR = Path(__file__).resolve().parent
DPI = 150  # resolution the pages are drawn at; also used to size the scanned PDF pages
LETTER_PX = (1275, 1650)  # 8.5 x 11 in at DPI
RECEIPT_PX = (600, 1400)
GRAY_LEVELS = 16  # PNGs are stored as 4-bit palette images: small, and text still looks smooth
INK = 24  # near-black, as printed ink scans
PAPER = 255

FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
    Path("C:/Windows/Fonts"),
)
FONT_FILES = {
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
}


@cache
def font(style: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Return a DejaVu font of `style` at `size` px, or Pillow's default font at that size."""
    for folder in FONT_DIRS:
        path = folder / FONT_FILES[style]
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.truetype(FONT_FILES[style], size)  # Pillow also looks in system font folders
    except OSError:
        return ImageFont.load_default(size=size)


def text_width(draw: ImageDraw.ImageDraw, text: str, style: str, size: int) -> float:
    """Return the advance width of `text` in pixels."""
    return draw.textlength(text, font=font(style, size))


def wrap(draw: ImageDraw.ImageDraw, text: str, style: str, size: int, width: float) -> list[str]:
    """Greedily break `text` into lines no wider than `width` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and text_width(draw, candidate, style, size) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def save_png(image: Image.Image, name: str) -> bytes:
    """Save a grayscale page as a 4-bit palette PNG in OUT_DIR and return its bytes."""
    step = 255 / (GRAY_LEVELS - 1)
    levels = image.convert("L").point(lambda v: round(round(v / step) * step))
    paletted = levels.point(lambda v: round(v / step)).convert("P")
    palette: list[int] = []
    for index in range(GRAY_LEVELS):
        gray = round(index * step)
        palette += [gray, gray, gray]
    paletted.putpalette(palette)
    buffer = io.BytesIO()
    paletted.save(buffer, format="PNG", optimize=True, bits=4, dpi=(DPI, DPI))
    data = buffer.getvalue()
    (OUT_DIR / name).write_bytes(data)
    return data


# --- receipt -------------------------------------------------------------------------

SHOP = (
    "HARBOUR STREET MARKET",
    "14 Harbour Street, Portmaddock",
    "Tel. 01766 512 330",
    "VAT No. GB 318 4471 62",
)
GROCERIES = (
    ("Sourdough loaf 800g", Decimal("3.40")),
    ("Free range eggs x6", Decimal("2.35")),
    ("Whole milk 2L", Decimal("1.65")),
    ("Cheddar mature 350g", Decimal("3.95")),
    ("Bananas loose 1.2kg", Decimal("1.08")),
    ("Tomatoes vine 500g", Decimal("1.90")),
    ("Olive oil extra virgin", Decimal("6.75")),
    ("Spaghetti 500g", Decimal("0.95")),
    ("Ground coffee 227g", Decimal("4.60")),
    ("Greek yoghurt 500g", Decimal("2.20")),
    ("Apples Braeburn x4", Decimal("1.80")),
    ("Washing up liquid", Decimal("1.25")),
    ("Dark chocolate 100g", Decimal("1.99")),
    ("Oat biscuits 300g", Decimal("1.45")),
    ("Smoked salmon 120g", Decimal("4.25")),
    ("Basil plant", Decimal("1.75")),
)
VAT_RATE = Decimal("0.20")  # applied to the non-food lines only, as UK shops print it


def draw_receipt(rng: random.Random) -> Image.Image:
    """Draw a till receipt with items, quantities, VAT, total and card payment."""
    width, height = RECEIPT_PX
    image = Image.new("L", RECEIPT_PX, PAPER)
    draw = ImageDraw.Draw(image)
    margin = 34
    size = 21
    y = 48

    def centred(text: str, style: str = "mono", px: int = size) -> None:
        nonlocal y
        x = (width - text_width(draw, text, style, px)) / 2
        draw.text((x, y), text, font=font(style, px), fill=INK)
        y += round(px * 1.45)

    def row(left: str, right: str, style: str = "mono", px: int = size) -> None:
        nonlocal y
        draw.text((margin, y), left, font=font(style, px), fill=INK)
        x = width - margin - text_width(draw, right, style, px)
        draw.text((x, y), right, font=font(style, px), fill=INK)
        y += round(px * 1.45)

    def rule(char: str = "-") -> None:
        nonlocal y
        count = int((width - 2 * margin) // text_width(draw, char, "mono", size))
        draw.text((margin, y), char * count, font=font("mono", size), fill=INK)
        y += round(size * 1.45)

    centred(SHOP[0], "mono-bold", 30)
    y += 4
    for line in SHOP[1:]:
        centred(line)
    y += 10
    rule("=")
    row("Date: 14/03/2024", "Time: 17:42")
    row("Till 3  Op: Megan", f"Rcpt {rng.randint(10000, 99999)}")
    rule("=")

    non_food = {"Washing up liquid", "Basil plant"}
    items = rng.sample(GROCERIES, 11)
    total = Decimal("0.00")
    vat_base = Decimal("0.00")
    units = 0
    for name, unit in items:
        quantity = rng.choice((1, 1, 1, 2, 3))
        amount = unit * quantity
        units += quantity
        total += amount
        if name in non_food:
            vat_base += amount
        marker = " A" if name in non_food else "  "
        row(name, f"{amount:.2f}{marker}")
        if quantity > 1:
            row(f"   {quantity} @ {unit:.2f}", "")
    rule()
    discount = Decimal("1.50")
    row("Multibuy saving", f"-{discount:.2f}  ")
    total -= discount
    rule()
    row(f"{units} ITEMS", "")
    row("TOTAL", f"GBP {total:.2f}  ", "mono-bold", 27)
    y += 4
    row("Visa Contactless", f"{total:.2f}  ")
    row("Card ************4417", "")
    row("Auth code 08Q6HK", "")
    row("CHANGE DUE", "0.00  ")
    rule()
    vat = (vat_base * VAT_RATE / (1 + VAT_RATE)).quantize(Decimal("0.01"))
    row("VAT  Rate   Net    VAT", "")
    row(f"A    20%  {vat_base - vat:6.2f} {vat:6.2f}", "")
    rule()
    y += 8
    centred("Thank you for shopping with us!")
    centred("Refunds within 28 days with receipt")
    y += 14
    _draw_barcode(draw, rng, (width - 380) // 2, y, 380, 70)
    y += 82
    centred("0317 2024 0314 1742 0003")
    assert y < height - 20, "receipt content overflows the page"
    return image


def _draw_barcode(
    draw: ImageDraw.ImageDraw, rng: random.Random, x: int, y: int, width: int, height: int
) -> None:
    """Draw a barcode-like strip of random bars."""
    end = x + width
    while x < end - 4:
        bar = rng.choice((2, 2, 3, 4))
        draw.rectangle((x, y, x + bar - 1, y + height), fill=INK)
        x += bar + rng.choice((2, 3, 3, 5))


# --- prose ---------------------------------------------------------------------------

PROSE_TITLE = "Restoring the Portmaddock Harbour Light"
PROSE_SUBTITLE = "Annual report of the Harbour Heritage Trust, 2023"
PROSE_PARAGRAPHS = (
    "When the trustees first climbed the spiral stair of the harbour light in the spring of 2021, "
    "they found a building that had been quietly failing for decades. Salt had worked its way into "
    "the lime mortar of the tower, the lantern glazing was cracked in eleven places, and the "
    "cast-iron gallery had rusted through at two of its brackets. The light itself had been "
    "automated in 1987 and switched off entirely in 2009, when a modern beacon on the breakwater "
    "took over its duty to shipping.",
    "The work carried out over the past year has concentrated on making the structure sound "
    "before anything is done to restore its appearance. Specialist masons repointed the lower "
    "third of the tower using a hydraulic lime mix matched to samples taken from the original "
    "1842 courses. The gallery brackets were removed, cast again at a foundry in Shropshire from "
    "the surviving patterns, and refitted in October. Scaffolding came down a week before the "
    "first winter storm, which the tower weathered without further damage.",
    "Volunteers have played a larger part than we expected. More than sixty people gave their "
    "time to the project, cataloguing the keepers' logbooks, cleaning brass fittings from the "
    "lamp room and guiding visitors on the open days held each month from May to September. "
    "Almost four thousand people climbed the tower during those open days, and the donations "
    "they left covered nearly a fifth of the year's costs.",
    "The coming year will see the lantern reglazed and the original Fresnel lens returned from "
    "conservation. We hope to light the tower again on the evening of the harbour festival in "
    "August, not as an aid to navigation but as a reminder of the keepers who tended it for "
    "a hundred and sixty-seven years. The trustees thank every member, donor and volunteer who "
    "has made this possible.",
)


def draw_prose() -> Image.Image:
    """Draw a Letter page with a heading, four justified paragraphs and a page number."""
    width, height = LETTER_PX
    image = Image.new("L", LETTER_PX, PAPER)
    draw = ImageDraw.Draw(image)
    margin = 150  # 1 inch
    column = width - 2 * margin
    body, leading = 25, 38

    assert text_width(draw, PROSE_TITLE, "serif-bold", 40) <= column, "title wider than the column"
    draw.text((margin, 140), PROSE_TITLE, font=font("serif-bold", 40), fill=INK)
    draw.text((margin, 205), PROSE_SUBTITLE, font=font("serif-italic", 27), fill=INK)
    draw.line((margin, 258, width - margin, 258), fill=INK, width=2)

    y = 300
    for paragraph in PROSE_PARAGRAPHS:
        lines = wrap(draw, paragraph, "serif", body, column - 4)
        for number, line in enumerate(lines):
            indent = 40 if number == 0 else 0
            last = number == len(lines) - 1
            _draw_justified(draw, line, margin + indent, y, column - indent, body, justify=not last)
            y += leading
        y += 18

    page_label = "3"
    x = (width - text_width(draw, page_label, "serif", 24)) / 2
    draw.text((x, height - 120), page_label, font=font("serif", 24), fill=INK)
    assert y < height - 160, "prose overflows the page"
    return image


def _draw_justified(
    draw: ImageDraw.ImageDraw, line: str, x: float, y: float, width: float, size: int, *, justify: bool
) -> None:
    """Draw one line, stretching the spaces to fill `width` when `justify` is set."""
    words = line.split()
    if not justify or len(words) == 1:
        draw.text((x, y), line, font=font("serif", size), fill=INK)
        return
    words_width = sum(text_width(draw, word, "serif", size) for word in words)
    gap = (width - words_width) / (len(words) - 1)
    for word in words:
        draw.text((round(x), y), word, font=font("serif", size), fill=INK)
        x += text_width(draw, word, "serif", size) + gap


# --- table ---------------------------------------------------------------------------

TABLE_HEADER = ("Station", "Region", "Rainfall (mm)", "Change (%)")
TABLE_ROWS = (  # fixed, so the intro text above the table stays true
    ("Aberdaron", "Lleyn Peninsula", 812, 21.4),
    ("Bala Lake", "Gwynedd", 1_652, 6.2),
    ("Capel Curig", "Snowdonia", 3_120, -9.6),
    ("Harlech Point", "Ardudwy", 934, 10.3),
    ("Llanberis", "Snowdonia", 2_473, 5.3),
    ("Porthmadog", "Eifionydd", 1_418, 7.1),
    ("Pwllheli", "Lleyn Peninsula", 1_011, -6.5),
    ("Tywyn", "Meirionnydd", 1_206, -7.2),
)


def draw_table() -> Image.Image:
    """Draw a Letter page with a short intro, a ruled 4-column table and its caption."""
    width, _ = LETTER_PX
    image = Image.new("L", LETTER_PX, PAPER)
    draw = ImageDraw.Draw(image)
    margin = 150
    draw.text((margin, 140), "4. Rainfall at the coastal stations", font=font("sans-bold", 34), fill=INK)
    intro = (
        "Annual rainfall was recorded at eight stations along the coast and in the uplands. "
        "The wettest station was again Capel Curig; the driest, Aberdaron, saw the largest "
        "relative increase on the previous year. Figures are totals for the calendar year 2023."
    )
    y = 210
    for line in wrap(draw, intro, "serif", 24, width - 2 * margin):
        draw.text((margin, y), line, font=font("serif", 24), fill=INK)
        y += 36

    columns = (margin, margin + 270, margin + 540, margin + 775, width - margin)
    row_height = 58
    top = y + 50
    rows = [TABLE_HEADER]
    for station, region, rainfall, change in TABLE_ROWS:
        rows.append((station, region, f"{rainfall:,}", f"{change:+.1f}"))
    mean = round(sum(row[2] for row in TABLE_ROWS) / len(TABLE_ROWS))
    rows.append(("Mean", "", f"{mean:,}", ""))

    bottom = top + row_height * len(rows)
    draw.rectangle((columns[0], top, columns[-1], top + row_height), fill=228)
    draw.rectangle((columns[0], top, columns[-1], bottom), outline=INK, width=3)
    for x in columns[1:-1]:
        draw.line((x, top, x, bottom), fill=INK, width=1)
    for index, cells in enumerate(rows):
        row_top = top + index * row_height
        if index > 0:
            draw.line(
                (columns[0], row_top, columns[-1], row_top),
                fill=INK,
                width=3 if index in (1, len(rows) - 1) else 1,
            )
        bold = index == 0 or index == len(rows) - 1
        for column, cell in enumerate(cells):
            style = "sans-bold" if bold else "sans"
            left, right = columns[column], columns[column + 1]
            numeric = column >= 2 and index > 0  # numbers align right
            cell_x = right - 18 - text_width(draw, cell, style, 23) if numeric else left + 18
            draw.text((cell_x, row_top + 16), cell, font=font(style, 23), fill=INK)

    caption = (
        "Table 4. Annual rainfall by station, 2023. Change is relative to the 2022 total. "
        "Source: Harbour Heritage Trust weather volunteers."
    )
    y = bottom + 28
    for line in wrap(draw, caption, "serif-italic", 22, columns[-1] - columns[0]):
        draw.text((margin, y), line, font=font("serif-italic", 22), fill=INK)
        y += 32

    y += 40
    after = (
        "Totals at the upland stations are sensitive to the siting of the gauge; the Llanberis "
        "gauge was moved forty metres downhill in June, and its figure should be read with care."
    )
    for line in wrap(draw, after, "serif", 24, width - 2 * margin):
        draw.text((margin, y), line, font=font("serif", 24), fill=INK)
        y += 36
    label = "12"
    draw.text(
        ((width - text_width(draw, label, "serif", 24)) / 2, LETTER_PX[1] - 120),
        label,
        font=font("serif", 24),
        fill=INK,
    )
    return image


# --- PDFs ----------------------------------------------------------------------------

PDF_PAGE_TWO = (  # (kind, text): "h" a section heading, "p" a paragraph
    ("h", "Finances"),
    (
        "p",
        "The Trust's income for the year was a little over ninety-two thousand pounds, of which "
        "grants from the National Lottery Heritage Fund and the county council made up the larger "
        "part. Membership subscriptions rose for the third year running, and the open days brought "
        "in more than we had budgeted for. Expenditure was dominated by the masonry contract and the "
        "casting of the new gallery brackets, both of which came in within their agreed budgets.",
    ),
    (
        "p",
        "We ended the year with a modest surplus, which the trustees have set aside towards the "
        "lantern reglazing. The full accounts, examined independently by Pryce and Owen, are "
        "available to members on request and will be presented at the annual general meeting.",
    ),
    ("h", "Membership and events"),
    (
        "p",
        "The Trust now has 412 members, up from 355 a year ago. Talks in the Sailors' Institute "
        "were well attended through the winter, and the children's drawing competition drew more "
        "than a hundred entries from the three primary schools in the town. The winning drawings "
        "hang in the lamp room and will stay there until the end of the season.",
    ),
    (
        "p",
        "Next year we plan a series of guided walks along the old pilot path, with the help of the "
        "coastguard station, and a small exhibition of the keepers' logbooks in the library.",
    ),
)


def write_prose_pdf(path: Path) -> None:
    """Write a 2-page Letter PDF of real, selectable vector text."""
    doc = pymupdf.open()
    width_pt, height_pt = pymupdf.paper_size("letter")
    margin = 72
    column = pymupdf.Rect(margin, margin, width_pt - margin, height_pt - margin)

    page = doc.new_page(width=width_pt, height=height_pt)
    y: float = margin
    page.insert_text((margin, y + 20), PROSE_TITLE, fontname="tibo", fontsize=19)
    page.insert_text((margin, y + 44), PROSE_SUBTITLE, fontname="tiit", fontsize=13)
    page.draw_line((margin, y + 56), (width_pt - margin, y + 56), width=0.8)
    y += 76
    for paragraph in PROSE_PARAGRAPHS:
        y = _insert_paragraph(page, paragraph, column, y)
    _insert_page_number(page, 1)

    page = doc.new_page(width=width_pt, height=height_pt)
    y = margin
    for index, (kind, text) in enumerate(PDF_PAGE_TWO):
        if kind == "h":
            y += 0 if index == 0 else 8
            page.insert_text((margin, y + 14), text, fontname="tibo", fontsize=14)
            y += 26
        else:
            y = _insert_paragraph(page, text, column, y)
    _insert_page_number(page, 2)

    _save_pdf(doc, path)


def _insert_paragraph(page: pymupdf.Page, text: str, column: pymupdf.Rect, y: float) -> float:
    """Insert a justified paragraph at `y` and return the y below it."""
    fontsize, lineheight = 11.5, 1.35
    rect = pymupdf.Rect(column.x0, y, column.x1, column.y1)
    spare = page.insert_textbox(
        rect,
        text,
        fontname="tiro",
        fontsize=fontsize,
        lineheight=lineheight,
        align=pymupdf.TEXT_ALIGN_JUSTIFY,
    )
    if spare < 0:
        raise ValueError("paragraph does not fit on the page")
    return rect.y1 - spare + 8


def _insert_page_number(page: pymupdf.Page, page_number: int) -> None:
    """Put a centred page number at the foot of `page`."""
    label = str(page_number)
    x = (page.rect.width - pymupdf.get_text_length(label, fontname="tiro", fontsize=11)) / 2
    page.insert_text((x, page.rect.height - 40), label, fontname="tiro", fontsize=11)


def write_scanned_pdf(path: Path, pngs: list[bytes]) -> None:
    """Write a PDF whose pages are only images, each sized to its image at DPI."""
    doc = pymupdf.open()
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            width_px, height_px = image.size
        page = doc.new_page(width=width_px * 72 / DPI, height=height_px * 72 / DPI)
        page.insert_image(page.rect, stream=data)
    _save_pdf(doc, path)


def _save_pdf(doc: pymupdf.Document, path: Path) -> None:
    """Save `doc` compressed, with fixed metadata and no random file id, so bytes repeat."""
    doc.set_metadata({"title": path.stem, "producer": "kosmos examples/make_examples.py"})
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    doc.close()


def main() -> None:
    """Draw every example file into OUT_DIR."""
    rng = random.Random(SEED)
    receipt = save_png(draw_receipt(rng), "receipt.png")
    save_png(draw_prose(), "prose.png")
    table = save_png(draw_table(), "table.png")
    write_prose_pdf(OUT_DIR / "prose.pdf")
    write_scanned_pdf(OUT_DIR / "scanned.pdf", [receipt, table])
    for name in ("receipt.png", "prose.png", "table.png", "prose.pdf", "scanned.pdf"):
        print(f"{name:12} {(OUT_DIR / name).stat().st_size:>8,} bytes")


if __name__ == "__main__":
    main()
