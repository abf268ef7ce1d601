# Two entry points for a fresh machine (see README): `make main` and `make test`.
# Both create .venv if needed, install torch's CPU wheel first (a plain `torch` requirement would pull
# the multi-GB CUDA build), then this package with its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision must match torch exactly (timm imports it): 2.13.0's CPU wheel has no matching torchvision here.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Use ../shared/data (the team's copy of MNIST / CIFAR-10) when it is there; else the usual search + download.
SHARED_DATA := $(abspath ../shared/data)
export CNNLAB_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: setup browser main lint test clean

$(BIN)/cnnlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/cnnlab

# The main job (a few minutes on 2 CPU cores; figures in the README): train and evaluate the tf.estimator MNIST CNN
# with the tutorial's settings shortened to 2,000 steps (the tutorial runs 20,000), then the fast MNIST recipe (99%).
# Each run gets an HTML report (runs/*/report.html).
main: setup
	$(BIN)/cnnlab train --recipe tf-estimator-cnn-mnist-short --model-dir runs/tf-estimator-cnn-short
	$(BIN)/cnnlab evaluate runs/tf-estimator-cnn-short
	$(BIN)/cnnlab train --recipe mnist-fast --model-dir runs/mnist-fast
	$(BIN)/cnnlab evaluate runs/mnist-fast

# Headless Chromium + ChromeDriver from Debian for the browser test of the served page (needs apt and root;
# elsewhere that one test is skipped, except under CI where it fails).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "note: chromium/chromedriver not installed; the browser test will be skipped"; fi; \
	fi

# ruff's settings are in pyproject.toml ([tool.ruff]).
lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs bench-out
