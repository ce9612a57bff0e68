#!/usr/bin/env bash
# Creates .venv (if missing) and installs san-jax's requirements into it.
#   bash scripts/setup.sh         runtime only (JAX, Flax, ...; no torch)
#   bash scripts/setup.sh --dev   plus the conversion/test requirements (CPU torch 2.13.0, pytest)
#   bash scripts/setup.sh --gpu   runtime plus jax's CUDA 12 plugin for an NVIDIA GPU (jax[cuda12] at the installed
#                                 jax version; CUDA 12 wheels run on any driver >= 525, CUDA 13 ones need >= 580).
#                                 No torch: a CUDA torch is never installed.
# Then scripts/build_native.sh builds the AVX512-BF16 GEMM (csrc/) with g++ where it can (san_jax/ops/gemm.py).
# The CLIP BPE vocabulary used by san_jax.text.tokenizer comes from the open_clip_torch wheel, installed
# with --no-deps so that it cannot pull torchvision or a CUDA torch; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  ""|--dev|--gpu) ;;
  *) echo "setup.sh: unknown option '$1' (expected none, --dev or --gpu)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# --dev: Debian's chromium for tests/test_app_browser.py (playwright drives it; no browser is ever downloaded
# by pip or playwright). Installed with apt-get where this runs as root on Debian; elsewhere say how.
if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: /usr/bin/chromium is missing (the browser test needs it): sudo apt-get install chromium" >&2
  fi
fi
# --no-compile: pip would byte-compile every module of every package; Python compiles the modules a program
# imports on their first import instead, and caches them (measured on the 2-core Zen 3 from fresh clones, in two
# pairs while the machine's speed varied: `bash scripts/setup.sh` 75 and 87 s against 84 and 134 s; a first
# `import jax, flax, optax, orbax.checkpoint, grain, scipy, matplotlib` then took 5.2 s, a second 5.6 s).
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check --no-compile "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
stamp=.venv/.san_jax_setup
want="$(cat requirements.txt requirements-dev.txt constraints.txt | sha1sum | cut -c1-12)${1:-}"
if [ -f "$stamp" ] && grep -qx -- "$want" "$stamp"; then
  bash scripts/build_native.sh
  exit 0
fi
case "${1:-}" in
  --dev) pip_install -r requirements-dev.txt -c constraints.txt ;;
  *) pip_install -r requirements.txt -c constraints.txt ;;
esac
if [ "${1:-}" = "--gpu" ]; then
  # The plugin must match jax exactly: ask the venv which jax requirements.txt resolved to.
  jax_version=$(.venv/bin/python -c "import jax; print(jax.__version__)")
  pip_install "jax[cuda12]==$jax_version" -c constraints.txt
fi
# open_clip_torch: the tokenizer's BPE vocabulary (and, for tests, the reference CLIP); timm: test reference.
pip_install --no-deps open_clip_torch==3.3.0 timm==1.0.22
bash scripts/build_native.sh
echo "$want" > "$stamp"
