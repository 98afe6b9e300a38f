# The two set-up commands of the README:
#   make demo   train a small detector on the built-in synthetic dataset, report its VOC mAP, draw detections
#   make test   run the test suite
# Each creates .venv and installs the toolkit into it when missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# --no-compile: no .pyc pass over torch's thousands of files at install (~17 s); imports compile what they use.
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m detect.cli.quickstart --out runs/quickstart

test: $(STAMP)
	@# CI (CI=true, root) also installs Debian's Chromium so the HTML-report browser test runs instead of skipping.
	@if [ -n "$$CI" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
