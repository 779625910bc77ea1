# `make demo` installs kosmos and transcribes an example page; `make test` installs and runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first: 2.13.0 is the release kosmos is tested with; `make install TORCH=torch` takes the newest instead.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,ray,ocrmypdf,serve
# The oldest transformers kosmos supports (5.20: the model became compile-ready), tested in its own venv.
OLDEST_TRANSFORMERS ?= transformers==5.20.0
OLDEST := .venv-oldest

.PHONY: install debian-packages demo test test-ray test-benchmarks test-oldest lint typecheck unit gpu-check gpu-rehearsal gpu-wheels bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# What the tests need from Debian (as root): jq for examples/pipeline.sh, DejaVu fonts for word boxes,
# Ghostscript and Tesseract for OCRmyPDF (tests/test_ocrmypdf.py), Chromium and its driver for the page
# `kosmos serve` shows (tests/test_server_page.py), curl for the README's server examples. Without
# them those tests are skipped.
DEBIAN_PACKAGES := jq fonts-dejavu-core ghostscript tesseract-ocr tesseract-ocr-eng tesseract-ocr-osd \
	chromium chromium-driver curl
debian-packages:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null

demo: install
	$(BIN)/kosmos md examples/prose.png

lint: install
	$(BIN)/ruff check kosmos_cli tests benchmarks examples
	$(BIN)/ruff format --check kosmos_cli tests benchmarks examples

typecheck: install
	$(BIN)/mypy

# Every test but the Ray ones and the benchmark scripts', on all cores (pytest-xdist).
unit: install
	$(BIN)/python -m pytest -n auto -m "not ray and not benchmarks"

# The benchmark scripts, end to end on the tiny model (CI runs them too).
test-benchmarks: install
	$(BIN)/python -m pytest -n auto -m benchmarks tests/test_benchmarks.py

test: lint typecheck unit

# The Ray tests: one local Ray instance, CPU actors (CI runs them too).
test-ray: install
	$(BIN)/python -m pytest -m ray tests/test_ray.py

# The tests that touch transformers, on the oldest release kosmos supports (CI runs it too).
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -n auto tests/test_generation.py tests/test_testing.py tests/test_exact.py tests/test_api.py \
		tests/test_sharing.py

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet "$(TORCH)"
	$(OLDEST)/bin/python -m pip install --quiet -e ".[dev]" "$(OLDEST_TRANSFORMERS)"
	touch $@

# The GPU check (benchmarks/gpu_check.sh): on a machine with one NVIDIA GPU, after `make gpu-wheels`.
gpu-check:
	bash benchmarks/gpu_check.sh

# Wheels for the GPU machine (Python 3.12, no network, transformers 5.17, no PyMuPDF, no jsonschema), into .whl/:
# the oldest transformers kosmos supports, whose huggingface-hub requirement (>= 1.31) the machine's
# 1.33.0 meets (newer releases need hub 2.x, which would have to travel too), and PyMuPDF.
GPU_PYTHON ?= 3.12
# jsonschema and what it needs that the machine lacks (kosmos convert checks JSON with it).
GPU_WHEELS ?= $(OLDEST_TRANSFORMERS) pymupdf==1.27.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
	referencing==0.37.0 rpds-py==2026.9.1
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The GPU check rehearsed on this CPU in the GPU machine's software: Python 3.12 (pyenv's here), its
# packages (benchmarks/gpu-machine.txt), the carried wheels installed over them as the check installs
# them, then the check's dry run. CI runs it: a carry or an import that would fail there fails here.
REHEARSAL := .venv-gpu
GPU_PYTHON_BIN ?= $(shell for p in $$(ls -d $$HOME/.pyenv/versions/$(GPU_PYTHON).*/bin/python$(GPU_PYTHON) 2>/dev/null) \
	$$(command -v python$(GPU_PYTHON)); do $$p --version >/dev/null 2>&1 && echo $$p && break; done)
gpu-rehearsal: $(REHEARSAL)/.installed gpu-wheels
	PYTHON=$(REHEARSAL)/bin/python OUT=$(or $(OUT),gpu-check) bash benchmarks/gpu_check.sh --dry-run

$(REHEARSAL)/.installed: benchmarks/gpu-machine.txt
	@test -n "$(GPU_PYTHON_BIN)" || { echo "error: no Python $(GPU_PYTHON) found (install it, or set GPU_PYTHON_BIN)"; exit 2; }
	$(GPU_PYTHON_BIN) -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/python -m pip install --quiet --upgrade pip
	$(REHEARSAL)/bin/python -m pip install --quiet -r benchmarks/gpu-machine.txt
	touch $@

bench: install
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) $(OLDEST) $(REHEARSAL) .whl build *.egg-info .pytest_cache .mypy_cache .ruff_cache gpu-check
