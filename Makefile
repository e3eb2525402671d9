# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,data,train,app
export HF_HUB_OFFLINE := 1
# DeepSpeed compiles its CPU ops on first use (~1 min): keep them across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pure/torch_extensions

.PHONY: test lint format demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check pure tests data_prep
	$(PY) -m ruff format --check pure tests data_prep
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check pure tests data_prep
	$(PY) -m ruff format --check pure tests data_prep

format: $(VENV)/.installed
	$(PY) -m ruff format pure tests data_prep
	$(PY) -m ruff check --fix pure tests data_prep

# The bundled demo checkpoint is a tiny *random* model (see README): it exercises the whole pipeline,
# it does not restore anything meaningfully yet.
examples/tiny-random/config.json: $(VENV)/.installed
	$(PY) -m pure.make_random_checkpoint examples/tiny-random --seed 0

demo: examples/tiny-random/config.json
	$(PY) -m pure.infer --input examples/lq_astronaut_128.png --model examples/tiny-random \
		--output outputs/demo_restored.png --overwrite

clean:
	rm -rf $(VENV) examples/tiny-random outputs .pytest_cache .ruff_cache
