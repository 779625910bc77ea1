"""Kosmos-2.5 as an OCRmyPDF OCR engine: `ocrmypdf --plugin kosmos_cli.ocrmypdf in.pdf out.pdf`.

OCRmyPDF does what it always does (rasterizing, `--skip-text`/`--redo-ocr`/`--force-ocr`, PDF/A,
optimization, `--sidecar`, page rotation); only the OCR is kosmos's. Its text layer gets kosmos's
lines and words (`words.split_words`), each word with its line's confidence.

OCRmyPDF OCRs pages in parallel worker processes. The model runs once, in a `serve.ModelService` this
plugin starts in OCRmyPDF's main process (`check_options`); workers send it their page images, and
pages from all workers decode together, so `-j N` is also how many pages share a batch.

Options (`ocrmypdf --help`, group "Kosmos-2.5"): `--kosmos-model`, `--kosmos-revision`,
`--kosmos-device`, `--kosmos-dtype`, `--kosmos-kv-dtype`, `--kosmos-batch-size`, `--kosmos-max-new-tokens`,
`--kosmos-threads`; the same as `kosmos ocr`'s options of those names. Python:
`ocrmypdf.ocr(..., plugins=["kosmos_cli.ocrmypdf"], kosmos_model="...")`.

Kosmos-2.5 reads English; it finds neither a page's orientation nor its skew, so `--rotate-pages` and
`--deskew` ask Tesseract, as the EasyOCR plugin does. OCRmyPDF needs Tesseract installed anyway, engine
plugin or not: its option checks read Tesseract's options, and its Tesseract plugin checks the
`tesseract` command at every run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocrmypdf import hookimpl
from ocrmypdf.builtin_plugins.tesseract_ocr import TesseractOcrEngine
from ocrmypdf.exceptions import BadArgsError, ExitCodeException
from ocrmypdf.hocrtransform import BoundingBox, OcrClass, OcrElement
from ocrmypdf.pluginspec import OcrEngine, OrientationConfidence
from pydantic import BaseModel

from kosmos_cli import __version__
from kosmos_cli.config import DTYPES, KV_DTYPES, Settings, default_model
from kosmos_cli.errors import KosmosError

if TYPE_CHECKING:
    from ocrmypdf._options import OcrOptions

    from kosmos_cli.serve import ModelService
    from kosmos_cli.values import PageResult

NAMESPACE = "kosmos"  # options.kosmos.<field>, from --kosmos-<field>
LANGUAGES = frozenset({"eng"})  # what Kosmos-2.5 was trained to read
# The `kosmos` options the plugin offers as `--kosmos-NAME`, as messages from kosmos name them.
_KOSMOS_OPTION = re.compile(
    r"(?<![\w-])--(model|revision|device|dtype|batch-size|max-new-tokens|threads|kv-dtype)\b"
)
_services: dict[Settings, ModelService] = {}  # one per settings, for the life of this process


class KosmosOptions(BaseModel):
    """The plugin's options, as OCRmyPDF hands them to every worker (`options.kosmos`)."""

    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_dtype: str = "auto"
    batch_size: int | None = None
    max_new_tokens: int | None = None
    threads: int | None = None
    service: str | None = None  # set by `check_options`: the model service's socket
    service_key: str | None = None  # and its key, in hex

    def settings(self) -> Settings:
        """Return kosmos's settings; raises UsageError for a value that names nothing."""
        fields = {field.name for field in dataclasses.fields(Settings)}
        chosen = {name: value for name, value in self.model_dump().items() if name in fields}
        return Settings(**{**chosen, "model": self.model or default_model()})


@hookimpl
def register_options() -> dict[str, type[BaseModel]]:
    return {NAMESPACE: KosmosOptions}


@hookimpl
def add_options(parser: Any) -> None:
    group = parser.add_argument_group("Kosmos-2.5", "OCR with Kosmos-2.5 (kosmos-transcribe's plugin)")
    group.add_argument(
        "--kosmos-model", dest="kosmos_model", metavar="ID_OR_FOLDER", help="Hub id or checkpoint folder."
    )
    group.add_argument(
        "--kosmos-revision", dest="kosmos_revision", help="Hub revision (branch, tag, commit)."
    )
    group.add_argument("--kosmos-device", dest="kosmos_device", help="auto, cpu, cuda, cuda:N or mps.")
    group.add_argument("--kosmos-dtype", dest="kosmos_dtype", choices=DTYPES, help="Weights' dtype.")
    group.add_argument(
        "--kosmos-kv-dtype", dest="kosmos_kv_dtype", choices=KV_DTYPES, help="The KV cache's dtype."
    )
    group.add_argument(
        "--kosmos-batch-size", dest="kosmos_batch_size", type=int, help="Most pages decoding together."
    )
    group.add_argument(
        "--kosmos-max-new-tokens", dest="kosmos_max_new_tokens", type=int, help="Token budget per page."
    )
    group.add_argument("--kosmos-threads", dest="kosmos_threads", type=int, help="CPU threads of the model.")


@hookimpl
def check_options(options: OcrOptions) -> None:
    """Check the options and start the model service the workers will use (once per settings)."""
    from PIL import Image

    from kosmos_cli.serve import ModelService

    Image.init()  # PIL registers its formats lazily and not thread-safely; OCRmyPDF may OCR in threads
    others = sorted(set(options.languages) - LANGUAGES)
    if others:  # before OCRmyPDF's own check, which would say to install language data for them
        raise BadArgsError(
            f"Kosmos-2.5 was trained to read English only: `-l {'+'.join(options.languages)}` asks for "
            f"{', '.join(others)}; drop -l, or pass -l eng"
        )
    try:
        settings = options.kosmos.settings()
    except KosmosError as error:
        raise BadArgsError(plugin_words(error.one_line())) from None
    service = _services.get(settings)
    if service is None or service.process.poll() is not None:
        try:
            service = _services[settings] = ModelService.start(settings)
        except KosmosError as error:
            raise ExitCodeException(plugin_words(error.one_line())) from None
    # Flat names, as argparse stores plugin options: they travel to the workers with the options.
    options.extra_attrs[f"{NAMESPACE}_service"] = service.address
    options.extra_attrs[f"{NAMESPACE}_service_key"] = service.authkey.hex()
    options.extra_attrs.pop(f"_plugin_cache_{NAMESPACE}", None)


def plugin_words(message: str) -> str:
    """Name kosmos's options as OCRmyPDF knows them: `--model` is `--kosmos-model` there."""
    return _KOSMOS_OPTION.sub(r"--kosmos-\1", message)


@hookimpl
def get_ocr_engine(options: OcrOptions | None) -> OcrEngine:
    return KosmosEngine()


class KosmosEngine(OcrEngine):
    """The engine OCRmyPDF calls in its workers; each page goes to the model service."""

    @staticmethod
    def version() -> str:
        return __version__

    @staticmethod
    def creator_tag(options: OcrOptions) -> str:
        return f"kosmos-transcribe {__version__} ({options.kosmos.model or default_model()})"

    def __str__(self) -> str:
        return f"Kosmos-2.5 (kosmos-transcribe {__version__})"

    @staticmethod
    def languages(options: OcrOptions) -> Set[str]:
        return LANGUAGES

    @staticmethod
    def get_orientation(input_file: Path, options: OcrOptions) -> OrientationConfidence:
        """Ask Tesseract (`--rotate-pages`): Kosmos-2.5 does not tell a page's orientation."""
        return TesseractOcrEngine.get_orientation(input_file, options)

    @staticmethod
    def get_deskew(input_file: Path, options: OcrOptions) -> float:
        """Ask Tesseract (`--deskew`): Kosmos-2.5 does not tell a page's skew."""
        return TesseractOcrEngine.get_deskew(input_file, options)

    @staticmethod
    def supports_generate_ocr() -> bool:
        return True

    @staticmethod
    def generate_ocr(input_file: Path, options: OcrOptions, page_number: int = 0) -> tuple[OcrElement, str]:
        """Transcribe one page image through the model service; return its lines and words, and its text."""
        result = _transcribe(input_file, options)
        return page_element(result, dpi=_dpi(input_file), page_number=page_number), result.text

    @staticmethod
    def generate_hocr(input_file: Path, output_hocr: Path, output_text: Path, options: OcrOptions) -> None:
        """Write one page image's hOCR and text (OCRmyPDF's hOCR pipelines)."""
        from kosmos_cli.writers.hocr import HocrWriter

        result = _transcribe(input_file, options)
        output_hocr.write_bytes(HocrWriter().render([result]))
        output_text.write_text(result.text, encoding="utf-8")

    @staticmethod
    def generate_pdf(input_file: Path, output_pdf: Path, output_text: Path, options: OcrOptions) -> None:
        raise NotImplementedError("Kosmos-2.5 does not draw PDFs: use --pdf-renderer auto or fpdf2")


def page_element(result: PageResult, *, dpi: float, page_number: int) -> OcrElement:
    """Return a page result as OCRmyPDF's tree: page, lines, words; boxes in the image's pixels."""
    info = result.info
    lines = []
    for line in result.lines:
        box = line.bbox
        if box is None:
            continue  # a line the model gave no usable box has no place in a text layer
        pieces = [(word.text, word.bbox) for word in line.words] or [(line.text, box)]
        words = [
            OcrElement(
                ocr_class=OcrClass.WORD, bbox=BoundingBox(*where), text=text, confidence=line.confidence
            )
            for text, where in pieces
        ]
        lines.append(
            OcrElement(
                ocr_class=OcrClass.LINE, bbox=BoundingBox(*box), confidence=line.confidence, children=words
            )
        )
    return OcrElement(
        ocr_class=OcrClass.PAGE,
        bbox=BoundingBox(0, 0, info.width, info.height),
        dpi=dpi,
        page_number=page_number,
        children=lines,
    )


def _transcribe(input_file: Path, options: OcrOptions) -> PageResult:
    """Send a page image to the model service; a page the model fails stops OCRmyPDF with why."""
    from kosmos_cli.serve import transcribe_image
    from kosmos_cli.values import Status

    chosen = options.kosmos
    if chosen.service is None or chosen.service_key is None:
        raise ExitCodeException("the kosmos model service was not started (check_options did not run)")
    try:
        result = transcribe_image(chosen.service, bytes.fromhex(chosen.service_key), str(input_file))
    except KosmosError as error:
        raise ExitCodeException(plugin_words(error.one_line())) from None
    if result.status is Status.FAILED:
        raise ExitCodeException(plugin_words(f"Kosmos-2.5 could not transcribe the page: {result.error}"))
    return result


def _dpi(image_file: Path) -> float:
    """Return an image's DPI as OCRmyPDF wrote it (its rasterizing resolution)."""
    from PIL import Image

    with Image.open(image_file) as image:
        dpi = image.info.get("dpi", (300.0, 300.0))
    return float(dpi[0] if isinstance(dpi, tuple) else dpi)
