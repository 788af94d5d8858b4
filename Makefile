# qaf — common commands. `make help` lists them.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.DEFAULT_GOAL := help
.PHONY: help install run sweep test test-all mutants bench gpu-check tables clean screenshot

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: .make/installed ## install qaf and its test tools (pip, editable; again only when pyproject.toml changes)

.make/installed: pyproject.toml
	$(PIP) install -q -e ".[dev]"
	@mkdir -p .make && touch $@

run: install ## the default job: fp32 and ptq on the embedded CIFAR-10 ResNet-20
	$(PYTHON) run.py -m method=fp32,ptq

sweep: install ## the QAF sweep: ADMM and ADMM-EPC at 4, 6 and 8 bits
	$(PYTHON) run.py -m method=admm,admm_epc bits=4,6,8

# Two workers (xdist), whole modules per worker so that module fixtures are built once.
XDIST ?= -n 2 --dist loadscope
# Bytecode caches on even where the environment turns them off: the test subprocesses and every
# later run then skip recompiling qaf and rewriting the test modules' asserts.
test test-all mutants: export PYTHONDONTWRITEBYTECODE =

test: install ## the fast test suite (under 3 minutes on 2 idle cores; slow tests deselected)
	$(PYTHON) -m pytest -q $(XDIST)

test-all: install ## every test, slow end-to-end ones included (what CI runs)
	$(PYTHON) -m pytest -q $(XDIST) -m ""

mutants: install ## deliberate bugs one at a time: which default-suite test catches each (tests/mutants.py)
	$(PYTHON) tests/mutants.py

bench: ## solver speed, LAPQ loss evaluations/s, ImageNet loaders, ONNX latency table, PyTorch CP speed ratio (prints them, writes bench.json)
	$(PYTHON) -m qaf.bench

GPU_CHECK_OUT ?= gpu_check.json
gpu-check: ## one GPU against the CPU: solvers, cuda tests, a ResNet-18 ImageNet run (JSON: GPU_CHECK_OUT=PATH)
	$(PYTHON) -m qaf.bench.gpu_check --out $(GPU_CHECK_OUT)

tables: ## tables, plot and HTML page for the newest sweep under multirun_outputs/
	$(PYTHON) -m qaf.report --latest

clean: ## remove run outputs, caches and build files
	rm -rf multirun_outputs/* multirun_outputs/.cache build dist *.egg-info .pytest_cache .make bench.json gpu_check.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

screenshot: ## PNG of the newest sweep's HTML report, rendered in headless Chromium (docs/img/dashboard.png)
	$(PYTHON) scripts/screenshot_dashboard.py --latest --out docs/img/dashboard.png
