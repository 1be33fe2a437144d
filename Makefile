# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install framelm into it first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of PyTorch first; pyproject's torch>=2.5 is then already satisfied.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/framelm run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs/demo
