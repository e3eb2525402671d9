# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,data,train,app
export HF_HUB_OFFLINE := 1
# DeepSpeed compiles its CPU ops on first use (~1 min): keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pure/torch_extensions

.PHONY: test test-pyiqa lint format demo pure-tiny clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check pure tests data_prep recipes
	$(PY) -m ruff format --check pure tests data_prep recipes
	$(PY) -m pytest -q

# pyiqa (the `eval` extra) needs torchvision, which cannot join the pinned CPU torch of .venv: its tests run
# in an environment of their own (recipes/eval/pyiqa-constraints.txt). Offline, pyiqa scores PSNR and SSIM
# only (the other metrics download weights); the tests use those two.
IQA_VENV ?= .venv-pyiqa
$(IQA_VENV)/.installed: pyproject.toml recipes/eval/pyiqa-constraints.txt
	$(PYTHON) -m venv $(IQA_VENV)
	$(IQA_VENV)/bin/python -m pip install -q --upgrade pip
	$(IQA_VENV)/bin/python -m pip install -q -c recipes/eval/pyiqa-constraints.txt -e ".[eval]" pytest
	touch $@

test-pyiqa: $(IQA_VENV)/.installed
	$(IQA_VENV)/bin/python -m pytest -q tests/test_eval.py tests/test_hub.py

lint: $(VENV)/.installed
	$(PY) -m ruff check pure tests data_prep recipes
	$(PY) -m ruff format --check pure tests data_prep recipes

format: $(VENV)/.installed
	$(PY) -m ruff format pure tests data_prep recipes
	$(PY) -m ruff check --fix pure tests data_prep recipes

# The bundled checkpoint, examples/pure-tiny, is PURE-tiny: trained from scratch offline by `make pure-tiny`
# (its model card says how and how well). The demo restores a hold-out image x4 with it, by 128 px tiles.
demo: $(VENV)/.installed
	$(PY) -m pure.infer --input examples/lq_astronaut_128.png --model examples/pure-tiny --scale 4 \
		--output outputs/demo_restored.png --compare --overwrite

# PURE-tiny from scratch (about an hour on 2 CPU cores); SHIP=1 replaces examples/pure-tiny with the result.
pure-tiny: $(VENV)/.installed
	PY=$(PY) bash recipes/pure_tiny/reproduce.sh

clean:
	rm -rf $(VENV) examples/tiny-random outputs .pytest_cache .ruff_cache
