# Quick start: `make demo` (offline, CPU, synthetic images) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# pip's configuration here may prefer a local CPU-only torch wheel that PyPI's torchvision cannot load
# ("operator torchvision::nms does not exist"): install the pair in isolated mode, then pin it.
PIP_CERT := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'/\1/p" | head -n1)
TORCH_PAIR := torch==2.13.0 torchvision==0.28.0
DEMO_DIR ?= runs/demo
OUT ?= results/gpu.md

.PHONY: setup dev demo lint test test-fast gpu-report clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --isolated install $(if $(PIP_CERT),--cert $(PIP_CERT)) $(TORCH_PAIR)
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e ".[notebooks]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

dev: $(VENV)/.dev

demo: setup
	$(PY) -m vaehelpers demo --out $(DEMO_DIR)

# ruff (pinned in the dev extra, so its formatting does not drift between machines) checks style first
lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# everything but the tests marked slow (training runs, subprocess spawns, notebooks, the browser)
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# Where a GPU is at hand, the first thing to run: doctor, bench in every precision, fp16 headroom, largest batch,
# two processes (2 GPUs), the GPU-only tests and 5 minutes of the reference run, as one page (under 12 minutes).
# On a CPU: the same sections at toy scale. dev: the GPU-only tests need pytest.
gpu-report: dev
	$(PY) -m vaehelpers.gpureport --out $(OUT) --called-as "make gpu-report OUT=$(OUT)"

clean:
	rm -rf $(DEMO_DIR)
