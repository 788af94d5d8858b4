# qaf — common commands. `make help` lists them.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.DEFAULT_GOAL := help
.PHONY: help install run sweep test test-all bench tables clean screenshot

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: ## install qaf and its test tools (pip, editable)
	$(PIP) install -q -e ".[dev]"

run: install ## the default job: fp32 and ptq on the embedded CIFAR-10 ResNet-20
	$(PYTHON) run.py -m method=fp32,ptq

sweep: install ## the QAF sweep: ADMM and ADMM-EPC at 4, 6 and 8 bits
	$(PYTHON) run.py -m method=admm,admm_epc bits=4,6,8

test: install ## the test suite (slow tests deselected)
	$(PYTHON) -m pytest -q

test-all: install ## every test, slow ones included
	$(PYTHON) -m pytest -q -m ""

bench: ## solver speed, LAPQ loss evaluations/s, ONNX latency table, PyTorch CP speed ratio (prints them, writes bench.json)
	$(PYTHON) -m qaf.bench

tables: ## tables, plot and HTML page for the newest sweep under multirun_outputs/
	$(PYTHON) -m qaf.report --latest

clean: ## remove run outputs, caches and build files
	rm -rf multirun_outputs/* multirun_outputs/.cache build dist *.egg-info .pytest_cache bench.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

screenshot: ## PNG of the newest sweep's HTML report, rendered in headless Chromium (docs/img/dashboard.png)
	$(PYTHON) scripts/screenshot_dashboard.py --latest --out docs/img/dashboard.png
