"""Force every model a Python process loads to generate `KOSMOS_TEST_FORCED_OUTPUT`, where it is set.

On PYTHONPATH (with `tests/`), for tests that run processes kosmos starts itself, such as the model
service behind the OCRmyPDF plugin (`kosmos_cli.serve`): the tiny model runs, its choices forced.
"""

import os

FORCED_OUTPUT_ENV = "KOSMOS_TEST_FORCED_OUTPUT"

if os.environ.get(FORCED_OUTPUT_ENV):
    from forced import forcing

    from kosmos_cli.model import loading

    loading.load_runner = forcing(loading.load_runner, os.environ[FORCED_OUTPUT_ENV])
