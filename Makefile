# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,data,train,app
export HF_HUB_OFFLINE := 1
# DeepSpeed compiles its CPU ops on first use (~1 min): keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pure/torch_extensions
# pytest-xdist workers for make test: most tests use one core, so two processes use a 2-core machine (the
# suite took 13 min of CI here, 6.5 with two). test-oldest stays on one: two made its 6 files slower.
TEST_WORKERS ?= 2

.PHONY: test test-oldest test-pyiqa lint format demo pure-tiny clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check pure tests data_prep recipes
	$(PY) -m ruff format --check pure tests data_prep recipes
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The inference and training tests once more against the oldest versions pyproject.toml declares
# (constraints-oldest.txt; everything else as constraints.txt pins it). CI runs it after `make test`.
OLD_VENV ?= .venv-oldest
OLDEST_TESTS ?= tests/test_dependency_bounds.py tests/test_model.py tests/test_engine.py \
	tests/test_gpu_paths.py tests/test_restorer.py tests/test_train.py
$(OLD_VENV)/.installed: pyproject.toml constraints.txt constraints-oldest.txt
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	awk -F'[=# ]' 'FNR == NR { if ($$1 != "") old[tolower($$1)] = 1; print; next } !(tolower($$1) in old)' \
		constraints-oldest.txt constraints.txt > $(OLD_VENV)/constraints.txt
	$(OLD_VENV)/bin/python -m pip install -q -c $(OLD_VENV)/constraints.txt -e ".[train,data]" pytest
	touch $@

# Its own DeepSpeed op cache: another DeepSpeed's ops in the same folder would be rebuilt at every switch.
test-oldest: export TORCH_EXTENSIONS_DIR := $(TORCH_EXTENSIONS_DIR)-oldest
test-oldest: $(OLD_VENV)/.installed
	$(OLD_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|huggingface.hub|tokenizers|safetensors|peft|accelerate|datasets|deepspeed) '
	$(OLD_VENV)/bin/python -m pytest -q $(OLDEST_TESTS)

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

# PURE-tiny (v2) from scratch, offline: about 7 hours on 2 CPU cores, and every step resumes where it stopped
# (VQ=examples/pure-tiny-v2/vq skips the tokenizer's 47 min). SHIP=1 replaces examples/pure-tiny with the result.
# v1, the first PURE-tiny (about an hour): bash recipes/pure_tiny/reproduce.sh.
pure-tiny: $(VENV)/.installed
	PY=$(PY) bash recipes/pure_tiny/reproduce_v2.sh

clean:
	rm -rf $(VENV) $(OLD_VENV) examples/tiny-random outputs .pytest_cache .ruff_cache
