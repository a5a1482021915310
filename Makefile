# cxr-node: every target bootstraps what it needs from nothing (pip + Debian packages).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSSTAMP := /var/tmp/cxrnode-sysdeps.stamp
DEBS := dcmtk dicom3tools libpixelmed-java default-jdk-headless orthanc orthanc-dicomweb redis-server postgresql chromium chromium-driver haproxy

.PHONY: run test lint bench sysdeps venv clean train

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Exactly these builds: pip takes them from local disk (see README).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[worker,train,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages for real DICOM peers and services; `apt-get update` once, install only what is missing.
sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  [ -f $(SYSSTAMP) ] || { apt-get update -qq && touch $(SYSSTAMP); }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

CONFIG ?= deploy/config/cxrnode.example.toml

run: $(STAMP)
	$(VENV)/bin/cxrnode serve --config $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check node workers training tests benchmarks
	$(VENV)/bin/ruff format --check node workers training tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: $(STAMP) sysdeps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: $(STAMP) sysdeps
	$(PY) -m benchmarks --out bench-results

clean:
	rm -rf $(VENV) var bench-results
