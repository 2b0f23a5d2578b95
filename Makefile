# Two targets for a fresh machine:
#   make demo   installs what is missing, then segments a colonoscopy clip with the built-in default model
#   make test   installs what is missing, then runs the test suite
# The virtual environment sees system site-packages, so a GPU machine keeps the torch build it has.
# Where no torch is installed, the CPU wheel torch==2.13.0 is taken (an unpinned torch pulls GBs of CUDA).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python scripts/pin_torchvision.py | xargs -r $(BIN)/python -m pip install -q --no-deps
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/make_demo_video.py demo/clip.mp4
	$(BIN)/vps-segment demo/clip.mp4 --out demo/masks.mp4 --overlay demo/overlay.mp4 --png-dir demo/png --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo .pytest_cache
