#!/usr/bin/env bash
# pure.quant's tests that need torchao, in `make test`'s .venv with torchao beside it rather than in it:
# installed, transformers imports torchao in every process, and on a CPU build of torch it logs two
# "Failed to load ..." warnings to stderr, which the CLIs' one-error-line tests do not expect.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SITE=.venv/torchao-site
VERSION=$(grep -E '^torchao==' constraints.txt | cut -d= -f3)
if [ ! -d "$SITE/torchao" ]; then
    "$PY" -m pip install -q --no-deps --target "$SITE" "torchao==$VERSION"
fi
PYTHONPATH="$SITE" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m pytest -q tests/test_quant.py tests/test_memory.py \
    tests/test_holdout.py::test_cli_quantize_measures_the_quantised_model_and_records_it "$@"
