"""Building blocks shared by the CLIP towers, the side ViT and the mask decoder.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...) as sharding metadata; the
config's rules map them to mesh axes (`san_jax.train.sharding`). `eager_sharding=False` keeps module
construction mesh-free (sharding is applied by `jax.jit(init, out_shardings=...)`). Activations are named
the same way through `constrain` (batch, length, embed, heads, mlp), which places them only while a
training step traces under `activation_sharding`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from san_jax.ops import gemm

Dtype = jnp.dtype
default_kernel_init = nnx.initializers.lecun_normal()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def with_axes(init: Callable, names: Sequence[Optional[str]]) -> Callable:
  """Initializer whose Param carries logical axis names (not sharded eagerly)."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[Optional[str]],
          dtype=jnp.float32) -> nnx.Param:
  """A free-standing Param (embeddings, projections) with logical axis names."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


def linear(in_features: int, out_features: int, axes: Sequence[Optional[str]], *, rngs: nnx.Rngs,
           use_bias: bool = True, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    dot_general=_dot_general, kernel_init=with_axes(default_kernel_init, axes),
                    bias_init=with_axes(zeros, axes[-1:]), rngs=rngs)


def _xla_partitions() -> bool:
  """Whether the program being traced is one XLA partitions over several devices: a step traced under
  `activation_sharding`, or any program traced under a multi-device mesh (`jax.set_mesh`,
  `jax.sharding.use_abstract_mesh`: the Segmenter's batch-sharded programs), outside shard_map. There a
  custom call, having no sharding rule, would make XLA gather its operands and run it whole on every device,
  so products and attention keep XLA's ops."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.manual_axes:
    return False
  return bool(_RESOLVERS) or (not mesh.empty and mesh.size > 1)


def _dot_general(*args, **kwargs) -> jax.Array:
  """Every Linear's product: `gemm.dot_general` (bfloat16 on the CPU's AVX512-BF16 units) unless XLA
  partitions the program."""
  if _xla_partitions():
    return jax.lax.dot_general(*args, **kwargs)
  return gemm.dot_general(*args, **kwargs)


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               axis_name: Optional[str] = "embed") -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                       scale_init=with_axes(ones, (axis_name,)), bias_init=with_axes(zeros, (axis_name,)),
                       rngs=rngs)


# ---- activation sharding ---------------------------------------------------------------------------------
# (logical names, shape) -> a Sharding, or None to leave the array unconstrained.
Resolver = Callable[[Tuple[Optional[str], ...], Tuple[int, ...]], Optional[jax.sharding.Sharding]]
_RESOLVERS: List[Resolver] = []


@contextlib.contextmanager
def activation_sharding(resolve: Resolver) -> Iterator[None]:
  """While a function is traced inside this context, `constrain` places activations by `resolve` (the
  training step resolves the config's logical-axis rules over its mesh). Tracing happens on the calling
  thread, so a plain stack is enough."""
  _RESOLVERS.append(resolve)
  try:
    yield
  finally:
    _RESOLVERS.pop()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """`x` under a sharding constraint from the logical names of its axes (padded with None to x.ndim).

  The identity outside `activation_sharding` (inference, the parity checks, class embeddings) and inside
  `shard_map` (the deterministic training step computes each device's examples whole, with every mesh
  axis manual)."""
  if not _RESOLVERS or jax.sharding.get_abstract_mesh().manual_axes:
    return x
  names = tuple(names) + (None,) * (x.ndim - len(names))
  sharding = _RESOLVERS[-1](names, tuple(x.shape))
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def tokens_axes(ndim: int, last: Optional[str] = "embed") -> Tuple[Optional[str], ...]:
  """Names of a token stream [B, L, D] ("batch", "length", last) or [B, ..., L, D] (the recognition head's
  [B, N, Q, D] SOS streams: the middle axes unnamed)."""
  return ("batch",) + (None,) * (ndim - 3) + ("length", last)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """[..., L, D] -> [..., L, heads, D / heads], constrained as ("batch", ..., "length", "heads", None)."""
  x = x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))
  return constrain(x, tokens_axes(x.ndim - 1, "heads"))


REMAT_MODES = ("none", "full")


def check_remat(remat: str) -> str:
  if remat not in REMAT_MODES:
    raise ValueError(f"remat={remat!r}: expected one of {list(REMAT_MODES)}")
  return remat


def rematerialized(fn: Callable, module: nnx.Module, remat: str) -> Callable:
  """`fn(module, *args)` as a function of `*args`; with remat "full" its backward recomputes the forward.

  Only the arguments (a transformer block's input, [B, L, D]) are kept for the backward, so the
  [B, heads, L, L] attention probabilities and the 4x-wide MLP activations of a block exist only while
  that block's gradient is taken: the backward holds one block's activations instead of all blocks'.
  The cost is one more forward of the module in the backward. Without differentiation this is the plain
  call. The module goes through nnx.split/merge (the stable NNX subset): the rematerialised function is
  a pure function of its parameters and inputs.
  """
  if check_remat(remat) == "none":
    return lambda *args: fn(module, *args)
  graphdef, state = nnx.split(module)
  return functools.partial(_recompute_in_backward, lambda st, *a: fn(nnx.merge(graphdef, st), *a), state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recompute_in_backward(pure: Callable, state, *args):
  """pure(state, *args), whose vjp recomputes the forward from (state, args) when the cotangent arrives.

  Why not `jax.checkpoint`: XLA:CPU drops the optimization barriers that keep its recomputation apart, so
  common-subexpression elimination merges the recomputed forward back into the original one and every
  intermediate stays alive (measured: no change in the temporaries of the SAN train step). Here the
  recomputation reads its inputs through `x + 0 * g[0]` (g the incoming cotangent): a data dependency
  that cannot run before the later blocks' backward and is not the forward's expression, so it is neither
  hoisted nor merged. x + 0 is exactly x for every finite cotangent (a non-finite cotangent makes the
  gradient non-finite either way), so results equal the plain backward's up to XLA's fusion choices.
  """
  return pure(state, *args)


def _recompute_fwd(pure, state, *args):
  return pure(state, *args), (state, args)


def _recompute_bwd(pure, residuals, g):
  state, args = residuals
  firsts = [leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree.leaves(g) if leaf.size]
  zero = jnp.zeros((), jnp.float32) * (sum(firsts) if firsts else jnp.zeros((), jnp.float32))
  args = jax.tree.map(lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
  _, vjp = jax.vjp(pure, state, *args)
  return vjp(g)


_recompute_in_backward.defvjp(_recompute_fwd, _recompute_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
  """torch.nn.GELU() (erf form), used by the timm side ViT."""
  return jax.nn.gelu(x, approximate=False)


# How `attention` computes: "exact" is the code below (the CPU parity path); "xla" and "cudnn" are
# jax.nn.dot_product_attention's implementations; "auto" picks cuDNN where it applies, else "exact".
ATTENTION_IMPLS = ("auto", "exact", "xla", "cudnn")
# cuDNN flash attention (jax.nn.dot_product_attention(implementation="cudnn")) takes float16/bfloat16 q/k/v
# with a head dim that is a multiple of 8, up to 128 before Hopper (256 on Hopper; the 128 bound keeps one
# rule for every NVIDIA GPU: SAN's head dims are 40 (side ViT) and 64 (CLIP B/16, L/14)).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def check_attention_impl(impl: str) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {list(ATTENTION_IMPLS)}")
  return impl


def attention_impl(requested: str, dtype, head_dim: int, has_bias: bool, backend: Optional[str] = None) -> str:
  """The one place that decides how attention runs: "exact", "xla" or "cudnn" for a call of `attention`.

  "auto" (the models' default) is "cudnn" on a GPU backend (`jax.default_backend()` at trace time unless
  `backend` is given) for bfloat16/float16 q/k/v, a head dim cuDNN takes and no additive bias (the only
  biased callers are the CLIP text tower's causal mask, run once per vocabulary; the recognition head's
  biased SOS attention is its own two-part softmax in rec_head.py); everywhere else "exact" (on a CPU,
  `attention`'s fused kernels where they apply, within float32 rounding of its unfused code). An explicit
  "cudnn" that cannot apply raises here, before tracing, instead of deep inside jax.
  """
  check_attention_impl(requested)
  if requested in ("exact", "xla"):
    return requested
  backend = jax.default_backend() if backend is None else backend
  why_not = []
  if backend != "gpu":
    why_not.append(f"backend {backend!r} is not 'gpu'")
  if jnp.dtype(dtype) not in CUDNN_DTYPES:
    why_not.append(f"dtype {jnp.dtype(dtype).name} is not bfloat16/float16")
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    why_not.append(f"head dim {head_dim} is not a multiple of 8 <= {CUDNN_MAX_HEAD_DIM}")
  if requested == "cudnn":
    if why_not:
      raise ValueError("attention_impl='cudnn' does not apply: " + "; ".join(why_not))
    return "cudnn"
  return "exact" if why_not or has_bias else "cudnn"


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """`jax.nn.softmax` over the last axis (the same forward, bit for bit) whose backward adds
  sum_k g_k y_k as a dot: XLA:CPU's row reduction of the fused product g * y ran ~70x slower than the
  same sum as a dot ([6, 1700, 1700] float32, the side ViT's attention: 238 ms vs 3.3 ms, measured
  2026-12-03), and it dominated the attention's backward pass."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = jax.nn.softmax(x, axis=-1)
  return y, y


def _softmax_bwd(y, g):
  dot = jnp.einsum("...k,...k->...", g, y, preferred_element_type=jnp.float32).astype(g.dtype)
  return (y * (g - dot[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None,
              query_chunk: Optional[int] = None, impl: str = "auto", dtype=None) -> jax.Array:
  """Softmax attention. q, k, v: [B, L, heads, head_dim]; bias broadcastable to [B, heads, Lq, Lk].

  `impl` (see `attention_impl`): the exact path applies the scale to q (as torch's MultiheadAttention
  does) and runs the softmax in float32; `query_chunk` splits its queries into blocks so the
  [heads, Lq, Lk] logits never exist whole: on CPU this keeps the working set in cache for long sequences
  (the side ViT's ~1,700 tokens). "xla" and "cudnn" are jax.nn.dot_product_attention (scale applied to the
  float32 logits; cuDNN's flash kernel never materialises the logits, so `query_chunk` does not apply).
  `dtype` (the calling module's compute dtype) casts q, k, v first: a bf16 Linear on a CPU returns its
  float32 sums (ops/gemm.py), and the products here take bf16 again. Without a bias on a CPU (float32 with
  AVX2 + FMA, bf16 with AVX512-BF16) the exact path runs as one fused custom call (`gemm.fused_attention`:
  the same products and softmax in another summation order, within float32 rounding of the code below);
  differentiated, float32 takes the fused backward call too and bf16 the code below (`_fused_forward`).
  """
  if dtype is not None:
    q, k, v = (t.astype(dtype) for t in (q, k, v))
  head_dim = q.shape[-1]
  if bias is not None:
    bias = jnp.asarray(bias)
    while bias.ndim < 4:
      bias = bias[None]
  chosen = attention_impl(impl, q.dtype, head_dim, bias is not None)
  if chosen != "exact":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=chosen)
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)

  def probs(logits, bias_blk, v):
    if bias_blk is not None:
      logits = logits + bias_blk.astype(jnp.float32)
    return softmax(logits).astype(v.dtype)

  def xla_block(q_blk, k, v, bias_blk):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", probs(logits, bias_blk, v), v)

  def gemm_block(q_blk, k, v, bias_blk):
    # The same two products as batched [B*heads] custom calls (bf16 on a CPU with AVX512-BF16): q k^T takes
    # k as stored (trans_b), and only q, k, v (not the [heads, Lq, Lk] logits) are transposed to heads-major.
    b, lq, h, d = q_blk.shape
    heads_major = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, t.shape[1], d)
    logits = gemm.matmul(heads_major(q_blk), heads_major(k), False, True).reshape(b, h, lq, -1)
    weights = probs(logits, bias_blk, v).reshape(b * h, lq, -1)
    out = gemm.matmul(weights, heads_major(v)).astype(v.dtype)
    return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)

  def block(q_blk, k, v, bias_blk):
    if not gemm.applies(q_blk, k, v) or _xla_partitions():
      return xla_block(q_blk, k, v, bias_blk)
    return jax.lax.platform_dependent(q_blk, k, v, bias_blk, cpu=gemm_block, default=xla_block)

  def unfused(q, k, v):
    lq = q.shape[1]
    if query_chunk is None or lq <= query_chunk:
      return block(q, k, v, bias)
    outs = []
    for start in range(0, lq, query_chunk):
      stop = min(start + query_chunk, lq)
      b = None
      if bias is not None:
        b = bias if bias.shape[2] == 1 else bias[:, :, start:stop]
      outs.append(block(q[:, start:stop], k, v, b))
    return jnp.concatenate(outs, axis=1)

  if bias is None and gemm.attention_applies(q, k, v) and not _xla_partitions() and _worth_fusing(q, k):
    fused = _fused_forward(unfused, fused_backward=jnp.dtype(q.dtype) == jnp.float32)
    return jax.lax.platform_dependent(q, k, v, cpu=fused, default=unfused)
  return unfused(q, k, v)


# float32 attention runs fused only from this many logits per head (Lq x Lk) on: below it the call's fixed
# costs (packing, waking the thread pool, a key block padded to 64) outweigh the gain. Measured on a 2-core
# Zen 3 (2026-12-07, medians of 200 calls, fused / XLA): 1x20 tokens x 3 heads 133 / 83 us; 32x65x2 (the demo's
# CLIP) 1,591 / 1,501 us; 1x117x3 164 / 278 us; 1x200x4 466 / 967 us; 1x401x12 (CLIP B/16) 7.5 / 8.8 ms.
F32_FUSED_MIN_LOGITS = 100 * 100


def _worth_fusing(q: jax.Array, k: jax.Array) -> bool:
  return jnp.dtype(q.dtype) != jnp.float32 or q.shape[1] * k.shape[1] >= F32_FUSED_MIN_LOGITS


def _fused_forward(unfused: Callable, fused_backward: bool) -> Callable:
  """(q, k, v) -> attention by a fused CPU custom call (ops/gemm.py `fused_attention`: float32, or bf16;
  no bias; its logits never leave 16-query tiles).

  Differentiated, float32 (`fused_backward`): the forward keeps q, k, v, the output and its log-sum-exp
  ([B, H, Lq]), and the backward is one more custom call (`gemm.fused_attention_bwd`) that recomputes the
  probabilities a tile at a time: the [B, H, Lq, Lk] probabilities, their cotangent and the softmax's are
  never stored, which is where XLA:CPU's backward of `unfused` spends its time and memory. Measured on the
  B/16 train step (640x640, batch 1, a 2-core Zen 3, 2026-12-07, three programs in one process called
  alternately, medians of 5): remat "none" 4.05 s and 0.87 GB of XLA temporaries against 6.42 s and
  2.04 GB with XLA's attention throughout (5.80 s with only the forward fused); remat "full" 4.80 s against
  5.09 s. Within float32 rounding of `unfused`'s gradients (tests/test_f32_attention.py).

  bfloat16: the forward under a gradient is `unfused`'s, whose saved probabilities feed its own backward
  (a bf16 backward from the log-sum-exp measured no faster on the side ViT's train step, a Zen 4,
  2026-12-04). Inference runs the fused kernel alone."""
  @jax.custom_vjp
  def fused(q, k, v):
    return gemm.fused_attention(q, k, v)[0]

  def fwd(q, k, v):
    if fused_backward:
      out, lse = gemm.fused_attention(q, k, v)
      return out, (q, k, v, out, lse)
    return jax.vjp(unfused, q, k, v)

  def bwd(res, g):
    if fused_backward:
      return gemm.fused_attention_bwd(*res, g)
    return res(g)

  fused.defvjp(fwd, bwd)
  return fused
