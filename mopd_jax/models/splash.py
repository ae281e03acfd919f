"""Splash attention: the Pallas TPU flash-attention kernel shipped in jax, behind our
full-sequence attention signature (the one `cudnn_attention` has).

`splash_attention(q, k, v, segment_ids)` takes q [B, T, H, D], k/v [B, T, KVH, D] and the
[B, T] segment ids (0 = padding) and applies the model's one attention rule: a query sees
the keys of its own segment at the same or an earlier slot. The kernel gets that as a static
causal mask (computed inside the kernel, blocks above the diagonal skipped) and-ed with
`SegmentIds`; for real queries "same segment" equals "same non-zero segment" because keys of
segment 0 are never in a real query's segment. Padding queries attend to earlier padding
keys (at least themselves), so their outputs are finite, as the model requires.

Decisions (see also docs/GOTCHAS.md):
- Blocks: every kernel block (q and kv, forward and backward) must be a multiple of 128
  and divide the sequence. We pad T up to a multiple of the block (padding slots get
  segment id 0, and they come after every real slot, so causality and the segment rule
  keep them out of every real query's softmax) and slice them off after. The default block
  is the largest of 512, 256, 128 that divides T rounded up to 128: never more than 127
  padding slots, and large blocks when T allows.
- GQA: the kernel's multi-head form takes k/v with fewer heads (H a multiple of KVH, query
  head h reads kv head h // (H // KVH), the grouping of `grouped_attention`): no repeat.
- Scale: the kernel does not scale scores; q is multiplied by 1/sqrt(D) first. Scores,
  softmax and the value accumulation are float32 inside the kernel; the output is q's dtype.
- Batch: the kernel takes one row; it is vmapped over B.
- Mesh: under a mesh context (`with jax.set_mesh(mesh):`) the kernel runs in `jax.shard_map`
  on each device's local rows (batch over the data x fsdp axes) and heads (over `tensor` when
  it divides both H and KVH, else replicated). A Mosaic kernel has no partitioning rule:
  jit over sharded inputs without shard_map does not compile for a TPU, so sharded runs must
  trace under the mesh context. Without one the kernel is called directly (one device).
- Precision: bf16 inputs trace the kernel at the default matmul precision (see
  `_at_default_precision`); float32 inputs keep the caller's.
- Interpret mode: a Pallas TPU kernel compiles only for a TPU; elsewhere it runs in the
  (slow) Pallas interpreter, which is how the CPU tests check it. `interpret=None` picks
  compiled when the target is a TPU. Ahead-of-time compilation for a TPU topology runs in a
  CPU process, so the target cannot be read off `jax.default_backend()` there: the AOT tool
  enters `compiling_for_tpu()` around tracing/lowering.
- Gradients: the kernel's custom VJP (its own dq and dkv Pallas kernels, which apply the same
  segment ids and causal mask) is what the model trains through.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from mopd_jax import sharding

Array = jax.Array

LANES = 128  # every splash block (q, kv, compute; forward and backward) is a multiple of this
DEFAULT_BLOCKS: tuple[int, ...] = (512, 256, 128)  # largest dividing the padded length wins

_COMPILING_FOR_TPU: contextvars.ContextVar[bool] = contextvars.ContextVar("compiling_for_tpu", default=False)


@contextlib.contextmanager
def compiling_for_tpu() -> Iterator[None]:
  """Within this context `splash_attention(interpret=None)` emits the compiled TPU kernel.

  For ahead-of-time compilation against a TPU topology from a CPU process. Enter it around
  the first trace of the jitted function (`.lower(...)`): jit caches traces without regard
  to this flag, so a function already traced outside the context keeps the interpreter.
  """
  token = _COMPILING_FOR_TPU.set(True)
  try:
    yield
  finally:
    _COMPILING_FOR_TPU.reset(token)


def use_interpret(interpret: bool | None = None) -> bool:
  """An explicit choice wins; otherwise interpret unless compiling for a TPU."""
  if interpret is not None:
    return interpret
  if _COMPILING_FOR_TPU.get():
    return False
  return jax.default_backend() != "tpu"


def block_and_length(t: int, block_size: int | None = None) -> tuple[int, int]:
  """(block, padded length) for a sequence of t tokens; the block divides the length."""
  if block_size is not None:
    if block_size <= 0 or block_size % LANES:
      raise ValueError(f"splash_attention: block_size must be a positive multiple of {LANES}, got {block_size}")
    return block_size, -(-t // block_size) * block_size
  padded = -(-t // LANES) * LANES
  return next(b for b in DEFAULT_BLOCKS if padded % b == 0), padded


def _block_sizes(block: int) -> splash_kernel.BlockSizes:
  return splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)


def _at_default_precision(fn: Callable) -> Callable:
  """fn(q, k, v, ids), its forward and backward kernels traced at the default matmul precision.

  Mosaic rejects fp32 contract precision on bf16 operands, so a global "highest" matmul
  precision (the tests set one) breaks the TPU compile; bf16 x bf16 products are exact in
  float32, so nothing is lost. The kernel's backward is traced when autodiff transposes, out
  of reach of a `with` around the call: hence a custom VJP that re-enters the scope there.
  """
  scope = lambda: jax.default_matmul_precision("default")

  @jax.custom_vjp
  def call(q, k, v, ids):
    with scope():
      return fn(q, k, v, ids)

  def call_fwd(q, k, v, ids):
    with scope():
      return jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)

  def call_bwd(vjp, g):
    with scope():
      return (*vjp(g), None)

  call.defvjp(call_fwd, call_bwd)
  return call


def _local_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, block: int, length: int,
                     interpret: bool) -> Array:
  """The kernel on local arrays: q [B,T,H,D], k/v [B,T,KVH,D], ids [B,T] -> [B,T,H,D]."""
  _, t, h, d = q.shape
  pad = length - t
  # Scale in float32, round once to the compute dtype (the kernel multiplies as given).
  q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
  to_kernel = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))  # [B, N, L, D]
  q, k, v = to_kernel(q), to_kernel(k), to_kernel(v)
  ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))  # padding slots: segment 0
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * h)
  kernel = splash_kernel.make_splash_mha(
      mask, block_sizes=_block_sizes(block), head_shards=1, q_seq_shards=1, interpret=interpret)
  attend = lambda q, k, v, ids: jax.vmap(kernel)(q, k, v, splash_kernel.SegmentIds(q=ids, kv=ids))
  if q.dtype != jnp.float32:  # float32 keeps the caller's precision (Mosaic takes fp32 there)
    attend = _at_default_precision(attend)
  out = attend(q, k, v, ids)  # [B, H, L, D]
  return out[:, :, :t].transpose(0, 2, 1, 3)


def _specs(mesh, batch: int, heads: int, kv_heads: int) -> tuple[P, P]:
  """(spec of q/k/v [B,T,N,D], spec of segment ids [B,T]) on `mesh`.

  Rows and heads by the rules table (`sharding.DEFAULT_RULES`) where they divide; otherwise that
  dimension is replicated (every device computes it: correct, only redundant).
  """
  names = set(mesh.axis_names)
  batch_axes = tuple(a for a in sharding.rule("activation_batch") if a in names)
  rows = batch_axes if batch_axes and batch % math.prod(mesh.shape[a] for a in batch_axes) == 0 else None
  return P(rows, None, sharding.heads_axis(mesh, heads, kv_heads), None), P(rows, None)


def _on_mesh(fn: Callable, mesh, batch: int, heads: int, kv_heads: int) -> Callable:
  qkv, ids = _specs(mesh, batch, heads, kv_heads)
  # check_vma=False: the Pallas call has no varying-axes rule to check against.
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv, check_vma=False)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, block_size: int | None = None,
                     interpret: bool | None = None) -> Array:
  """Causal, segment-masked attention with the Pallas TPU splash kernel (no KV cache).

  q [B,T,H,D], k/v [B,T,KVH,D] (H a multiple of KVH), segment_ids [B,T] (0 = padding)
  -> [B,T,H,D] in q's dtype. Scores are scaled by 1/sqrt(D), as in `grouped_attention`.

  block_size: the kernel's block (a multiple of 128); T is padded up to a multiple of it
    with padding slots (segment 0) that no real query sees, sliced off after. None: the
    largest of 512, 256, 128 dividing T rounded up to 128.
  interpret: run the Pallas interpreter (any backend, slow) instead of the compiled TPU
    kernel. None: compiled when `jax.default_backend() == "tpu"` or inside
    `compiling_for_tpu()`, interpreted otherwise.

  Under a mesh context (`jax.set_mesh`), runs per device in `jax.shard_map` (rows over
  data x fsdp, heads over tensor when it divides H and KVH); without one, called directly.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  if k.shape != (b, t, kvh, d) or v.shape != k.shape:
    raise ValueError(f"splash_attention: want q [B,T,H,D], k/v [B,T,KVH,D]; got q {q.shape}, k {k.shape}, v {v.shape}")
  if h % kvh:
    raise ValueError(f"splash_attention: {h} query heads are not a multiple of {kvh} kv heads")
  if segment_ids.shape != (b, t):
    raise ValueError(f"splash_attention: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  block, length = block_and_length(t, block_size)
  attend = functools.partial(_local_attention, block=block, length=length, interpret=use_interpret(interpret))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    attend = _on_mesh(attend, mesh, b, h, kvh)
  return attend(q, k, v, segment_ids)
