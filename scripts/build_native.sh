#!/usr/bin/env bash
# Builds san_jax/ops/_native/libsan_native.so (the AVX512-BF16 GEMM, the fused bf16 and float32 attentions,
# the matcher's assignment: XLA custom calls, san_jax/ops/gemm.py)
# from csrc/ with the machine's g++ against the XLA FFI headers jaxlib ships. Called by scripts/setup.sh;
# rebuilds only when a source (or jaxlib) is newer than the library. Without g++ or on a non-x86-64 machine
# it says so and builds nothing: san-jax then uses XLA's dot and attention, and the matcher runs scipy in a
# host callback (san_jax.ops.gemm.availability() and assignment_availability() tell which).
set -euo pipefail
cd "$(dirname "$0")/.."
out=san_jax/ops/_native/libsan_native.so
cxx=${CXX:-g++}
if [ "$(uname -m)" != x86_64 ]; then
  echo "build_native.sh: $(uname -m) is not x86-64: no native kernels, XLA's dot and attention and scipy's assignment are used" >&2; exit 0
fi
if ! command -v "$cxx" >/dev/null; then
  echo "build_native.sh: no $cxx: the native kernels are not built, XLA's dot and attention and scipy's assignment are used" >&2; exit 0
fi
inc=$(.venv/bin/python -c "import jax.ffi; print(jax.ffi.include_dir())")
if [ -f "$out" ] && [ -z "$(find csrc "$inc/xla/ffi/api/ffi.h" -newer "$out" -print -quit)" ]; then
  exit 0
fi
mkdir -p "$(dirname "$out")"
# No -march=native: the AVX2 and AVX-512 code carries target attributes and the library checks the CPU at run time,
# so one build loads on any x86-64 and falls back where the instructions are missing. -Wno-maybe-uninitialized:
# GCC 12 warns inside its own avx512fintrin.h (its `__Y = __Y` idiom), not about this code.
"$cxx" -O3 -std=c++17 -fPIC -shared -Wall -Wno-maybe-uninitialized -DNDEBUG -Icsrc -isystem "$inc" \
  csrc/bf16_gemm.cc csrc/bf16_attention.cc csrc/f32_attention.cc csrc/hungarian.cc csrc/bf16_gemm_ffi.cc -o "$out.tmp" -lpthread
mv "$out.tmp" "$out"
