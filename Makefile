# The verbs a contributor needs. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What `make demo` / `make test` install: the build side, both CPU runtimes, coremltools
# (Core ML conversion and compression run anywhere; prediction needs macOS) and ExecuTorch
# (its XNNPACK programs run here).
EXTRAS := torchao,build,onnx,openvino-build,coreml-build,executorch,demo,bench,dev
# Re-install when the dependency declarations change.
STAMP := $(VENV)/.installed
LINT_PATHS := modelkiln tests $(wildcard bench)

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help demo test test-fast browser lint format env compat perf clean

help:
	@echo "make demo       train the digits ViT, build it for every CPU backend, print the comparison"
	@echo "make test       run the whole test suite"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make browser    headless Chromium for the HTML report's render test (apt, as root)"
	@echo "make lint       ruff check + format check + mypy"
	@echo "make env        what this machine offers (runtimes, CPU features)"
	@echo "make compat     load our artifacts with optimum's ORT/OV classes (second venv)"
	@echo "make perf       docs/performance.md's tables: ViT-B/16 and an SD-1.5 UNet (~40 min)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision: pip must never choose another torch.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln demo

# Three workers on CI's two cores: most of the suite's time is torch.export tracing tiny
# models, one core each, and a worker waiting for a build another one makes (or for a
# subprocess) leaves its core idle: 28.5 min against 33.5 min with two (2026-12-07, Intel
# Xeon, 2 cores). A test file stays on one worker (--dist loadfile), so the builds its tests
# share are made once; `make test TEST_WORKERS=0` runs everything in one process.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) browser
	$(PYTEST)

test-fast: $(STAMP) browser
	$(PYTEST) -m "not slow"

# tests/bench/test_html_report.py renders report.html in headless Chromium. Installed where
# that is possible (apt, as root); anywhere else that test skips, so this never fails a target.
browser:
	@command -v chromium >/dev/null \
		|| (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
			&& apt-get update -qq >/dev/null \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "no chromium: the HTML render test will skip"

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

env: $(STAMP)
	$(BIN)/kiln env

# optimum-onnx pins transformers<4.58, which cannot live beside our pins: its own venv.
compat: $(STAMP)
	test -x .venv-optimum/bin/python || $(PYTHON) -m venv .venv-optimum
	.venv-optimum/bin/python -m pip install --quiet -c constraints.txt \
		torch torchvision optimum-onnx optimum-intel onnxruntime openvino nncf timm diffusers
	$(BIN)/python scripts/optimum_compat.py build artifacts/compat
	.venv-optimum/bin/python scripts/optimum_compat.py check artifacts/compat

# Random weights from the real configs; artifacts are built once under PERF_WORK and reused.
PERF_WORK ?= /tmp/kiln-perf
perf: $(STAMP)
	$(BIN)/python bench/performance_table.py --work $(PERF_WORK) --set calibration.size=2

clean:
	rm -rf artifacts .pytest_cache .ruff_cache .mypy_cache
