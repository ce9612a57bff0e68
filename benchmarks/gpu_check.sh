#!/usr/bin/env bash
# The GPU check: SAN B/16 inference and train step in bfloat16 at batch 8 and 32 on one NVIDIA GPU, with
# MFU (XLA's FLOP count against the chip's peak) and peak memory, in <= 5 minutes (benchmarks/gpu.py).
#
#   bash benchmarks/gpu_check.sh [FLAGS]          FLAGS go to `python -m benchmarks.gpu` (--models b16,l14, ...)
#   bash benchmarks/gpu_check.sh --smoke          configs/tiny.py, batch 1, 1 call: runs on a CPU (tests/)
#   PYTHON=python3 bash benchmarks/gpu_check.sh   an existing Python with jax[cuda] (no .venv needed)
#   bash benchmarks/gpu_check.sh --download_wheels DIR
#                                                  on a machine with network: wheels of the pure-Python
#                                                  packages a jax[cuda] image may lack (WHEELS_NEEDED)
#
# Python: $PYTHON, else .venv/bin/python (bash scripts/setup.sh --gpu), else python3; the repository is put
# on PYTHONPATH, nothing is installed into that Python. If $WHEELS names a folder of wheels, they are
# installed (--no-index --no-deps) into a scratch folder put first on PYTHONPATH; otherwise nothing is
# installed, and a missing package stops the check with the command that fetches its wheel.
# Results: the Markdown table on stdout; gpu_check.json and gpu_check.md in $OUT if set, else --out FILE.
# Before the benchmark, the GPU-only attention tests (cuDNN against the exact path) run when pytest imports.
set -euo pipefail
cd "$(dirname "$0")/.."
# ml_collections (configs), ftfy and its wcwidth (san_jax.text, imported by configs/common.py): the
# benchmark's only imports beyond jax, flax, optax, numpy, scipy, pillow, regex, absl and flax's own needs.
WHEELS_NEEDED="ml_collections==1.1.0 ftfy==6.3.1 wcwidth==0.9.4"
MODULES="jax flax optax numpy scipy PIL regex absl ml_collections ftfy"

if [ "${1:-}" = "--download_wheels" ]; then
  dir=${2:?usage: bash benchmarks/gpu_check.sh --download_wheels DIR}
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dir" $WHEELS_NEEDED
  ls "$dir"
  exit 0
fi
smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  site="${TMPDIR:-/tmp}/san_jax_gpu_check_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
# One interpreter start (jax's import is slow): the missing modules, else the versions and jax's backend.
if ! backend=$("$PYTHON" -c "
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
  print(' '.join(missing))
  sys.exit(3)
import flax, jax
print('gpu_check.sh: jax', jax.__version__, 'flax', flax.__version__, jax.devices(), file=sys.stderr)
print(jax.default_backend())" $MODULES); then
  echo "gpu_check.sh: $PYTHON cannot import: $backend. Fetch wheels where pip has network:" \
       "'bash benchmarks/gpu_check.sh --download_wheels .whl', then run with WHEELS=.whl" \
       "(or bash scripts/setup.sh --gpu for a .venv with everything)" >&2
  exit 2
fi
status=0
if [ "$smoke" = 0 ]; then
  if [ "$backend" != gpu ]; then
    echo "gpu_check.sh: jax's backend is '$backend', not 'gpu' (bash scripts/setup.sh --gpu installs jax's CUDA" \
         "plugin); only --smoke runs without one" >&2
    exit 2
  fi
  if "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "on_gpu or auto_picks" || status=1
  fi
fi
if [ "$smoke" = 1 ]; then
  "$PYTHON" -m benchmarks.gpu "$@" || status=$?
else
  # No row starts after --budget_s, and the benchmark is stopped at 300 s in all (the JSON is written after
  # every row, so what finished is kept). A later --budget_s in FLAGS wins. jax's persistent compilation
  # cache lets rows share what they have in common (the parameter initialisation of batch 8 and 32), and a
  # rerun on the same machine skip compiling (its compile_s then reads the cache).
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/san_jax_gpu_check_jax_cache}"
  timeout 300 "$PYTHON" -m benchmarks.gpu --budget_s 200 "$@" || status=$?
fi
exit $status
