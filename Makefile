# Two commands on a fresh machine with Python 3.11, pip and make:  make run  /  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from the local disk here; a GPU user sets e.g.
#   make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
# (torch==2.13.0 in constraints.txt matches its CUDA builds too, e.g. 2.13.0+cu128).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The tested version of every dependency (make constraints rewrites it from the venv).
CONSTRAINTS ?= constraints.txt
CONFIG ?= jobs/configs/smoke.yaml
# DeepSpeed compiles its C++ ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install constraints run test lint bench-prepare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/python -m pip check
	$(BIN)/python -c "import torch, ray, deepspeed; print('torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
	touch $@

# After changing dependencies in pyproject.toml and testing them: pin what was tested.
constraints: install
	$(BIN)/python .ci/freeze_constraints.py pyproject.toml > $(CONSTRAINTS)

run: install
	$(BIN)/python -m jobs.pipeline --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache outputs
