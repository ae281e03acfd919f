"""Losses: MOPD token-level distillation (MOPD_SPEC.md section 3) and the baselines (section 5).

Everything here is a pure function of arrays; nothing depends on a model. Layout:

1. Divergences on log-prob vectors over categories: `generalized_jsd` (forward KL at
   alpha = 0, reverse KL at alpha = 1, generalised JSD in between), top-k categories with
   a tail or renormalised.
2. Per-token statistics from logits (`token_stats`) and the memory-safe version from final
   hidden states and unembedding matrices (`chunked_token_stats`): logits are formed one
   sequence chunk at a time under `jax.checkpoint`, so neither the forward nor the backward
   pass ever holds [B, T, V].
3. Token weights and masks: importance weight, sampler/trainer mismatch correction,
   step-level averaging.
4. Aggregation registry (`LOSS_AGGREGATIONS`) and each mode's count (`AGG_DENOMINATORS`).
5. The MOPD loss on those statistics (`mopd_loss_from_stats`).
6. Baselines on per-token log-probs (`grpo_loss`, `dpo_loss`, `simpo_loss`, `sft_loss`), the
   in-jit preference pairs, and `chunked_target_logp` to get those log-probs.

Which loss a method trains with is decided once, by its object in `mopd_jax.methods`.

Conventions: `hidden[:, t]` predicts `targets[:, t]` (the caller shifts); masks are 0/1
floats or bools; log-probs are taken at the sampling temperature (logits / temperature),
for student and teacher alike. Log-probs must be finite (no -inf logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mopd_jax import fields

Array = jax.Array
PyTree = Any

# ---------------------------------------------------------------------------------------
# 1. Divergences over categories
# ---------------------------------------------------------------------------------------


def kl_divergence(logp: Array, logq: Array) -> Array:
  """KL(p || q), summed over the last axis."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def generalized_jsd(student_logp: Array, teacher_logp: Array, alpha: float) -> Array:
  """Per-position divergence between student and teacher, summed over the last axis.

  alpha = 0: KL(teacher || student); alpha = 1: KL(student || teacher); otherwise, with
  M = (1 - alpha) p_s + alpha p_t: (1 - alpha) KL(s || M) + alpha KL(t || M). The generalised
  JSD tends to 0 at both ends, so the endpoints are separate, exact KLs.
  """
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if alpha == 0.0:
    return kl_divergence(teacher_logp, student_logp)
  if alpha == 1.0:
    return kl_divergence(student_logp, teacher_logp)
  # log M by a two-term logsumexp: no underflow when either distribution is tiny.
  log_m = jnp.logaddexp(math.log1p(-alpha) + student_logp, math.log(alpha) + teacher_logp)
  return (1.0 - alpha) * kl_divergence(student_logp, log_m) + alpha * kl_divergence(teacher_logp, log_m)


def tail_log_mass(topk_logp: Array) -> Array:
  """log(1 - sum(exp(topk_logp))) over the last axis, stably.

  The captured mass is clamped below 1 (its log below -eps of the dtype) so the tail stays
  positive: finite log, finite gradients. Computed as log(-expm1(logsumexp(.))).
  """
  lse = jax.nn.logsumexp(topk_logp, axis=-1)
  lse = jnp.minimum(lse, -jnp.finfo(lse.dtype).eps)
  return jnp.log(-jnp.expm1(lse))


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """`lax.top_k` over the last axis, exact, in two cheap stages when the axis is wide.

  Why: on GPU, XLA has a TopK kernel only for k <= 16; k = 100 over a 128k vocabulary
  becomes a full segmented radix sort of every row (103 of 502 ms in the 1B train step on an
  H100, experiments/README.md). Here the last axis is cut into blocks of b; the k blocks
  with the largest maxima hold the k largest values (every other block's maximum is <= the
  k-th largest block maximum <= the k-th largest value), so one top-k over V/b block maxima
  and one over the k*b gathered candidates replace the sort over V.
  Values are exactly `lax.top_k`'s; ids too, except among exactly equal values, where
  either may name a different one of the tied ids.
  """
  v = x.shape[-1]
  block = 1 << max(4, round(math.log2(math.sqrt(v / k))))  # about minimises V/b + k*b
  n_blocks = -(-v // block)
  if v < 8192 or n_blocks < 2 * k:
    return lax.top_k(x, k)
  lead = x.shape[:-1]
  padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_blocks * block - v)], constant_values=-jnp.inf)
  blocks = padded.reshape(*lead, n_blocks, block)
  _, best_blocks = lax.top_k(jnp.max(blocks, axis=-1), k)
  best_blocks = jnp.sort(best_blocks, axis=-1)  # candidates in id order: ties go to the lower id
  candidates = jnp.take_along_axis(blocks, best_blocks[..., None], axis=-2).reshape(*lead, k * block)
  values, where = lax.top_k(candidates, k)
  ids = jnp.take_along_axis(best_blocks, where // block, axis=-1) * block + where % block
  return values, ids


def student_topk_ids(student_logp: Array, k: int) -> Array:
  """Ids of the student's k most likely tokens (no gradient flows through ids)."""
  _, ids = top_k(lax.stop_gradient(student_logp), k)
  return ids


def topk_categories(student_logp: Array, teacher_logp: Array, ids: Array, use_tail: bool) -> tuple[Array, Array]:
  """Both log-prob vectors restricted to `ids` [..., k], plus a tail category or renormalised."""
  s = jnp.take_along_axis(student_logp, ids, axis=-1)
  t = jnp.take_along_axis(teacher_logp, ids, axis=-1)
  if use_tail:
    s = jnp.concatenate([s, tail_log_mass(s)[..., None]], axis=-1)
    t = jnp.concatenate([t, tail_log_mass(t)[..., None]], axis=-1)
  else:
    s, t = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
  return s, t


# ---------------------------------------------------------------------------------------
# 2. Per-token statistics, plain and chunked
# ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class TokenStats:
  """Per-token quantities, each [B, T]. Only `divergence` and `student_logp` carry gradient.

  `divergence` is the per-token divergence over the chosen categories (full-logits mode) or
  the sampled-token estimate log p_s(y) - log p_t(y) (sampled mode). Masses are measured at
  the student's top-k ids (1 and 0 when top_k is None); tail = 1 - top-k mass.
  """

  divergence: Array
  student_logp: Array  # log p_s(target)
  teacher_logp: Array  # log p_t(target), no gradient
  student_entropy: Array
  student_topk_mass: Array
  teacher_topk_mass: Array  # teacher mass on the student's top-k ids
  student_tail_mass: Array
  teacher_tail_mass: Array


# Names of the small per-chunk teacher tensors the backward pass keeps instead of
# recomputing the teacher's [B, C, V] logits (see `chunked_token_stats`).
_SAVED_NAMES = ("mopd_topk_ids", "mopd_teacher_cats", "mopd_teacher_target_logp")


def token_stats(
    student_logits: Array,
    teacher_logits: Array,
    targets: Array,
    *,
    top_k: int | None = 100,
    use_tail: bool = True,
    alpha: float = 0.5,
    temperature: float = 1.0,
    full_logits: bool = True,
) -> TokenStats:
  """`TokenStats` from logits [..., V] (materialised; use `chunked_token_stats` for long T)."""
  vocab = student_logits.shape[-1]
  if top_k is not None and not 0 < top_k <= vocab:
    raise ValueError(f"top_k must be in [1, vocab={vocab}] or None, got {top_k}")
  s_logp = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  t_logp = lax.stop_gradient(jax.nn.log_softmax(teacher_logits / temperature, axis=-1))
  take = lambda lp: jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
  s_tgt = take(s_logp)
  t_tgt = checkpoint_name(take(t_logp), "mopd_teacher_target_logp")
  entropy = lax.stop_gradient(-jnp.sum(jnp.exp(s_logp) * s_logp, axis=-1))
  ones = jnp.ones_like(s_tgt)

  if top_k is None:
    s_mass, t_mass = ones, ones
    s_cats, t_cats = s_logp, t_logp
  else:
    ids = checkpoint_name(student_topk_ids(s_logp, top_k), "mopd_topk_ids")
    s_top = lax.stop_gradient(jnp.take_along_axis(s_logp, ids, axis=-1))
    t_top = jnp.take_along_axis(t_logp, ids, axis=-1)
    s_mass, t_mass = jnp.exp(jax.nn.logsumexp(s_top, -1)), jnp.exp(jax.nn.logsumexp(t_top, -1))
    if full_logits:
      s_cats, t_cats = topk_categories(s_logp, t_logp, ids, use_tail)
      t_cats = checkpoint_name(t_cats, "mopd_teacher_cats")

  if full_logits:
    divergence = generalized_jsd(s_cats, t_cats, alpha)
  else:
    divergence = s_tgt - t_tgt  # one-sample estimate of KL(s || t) at the sampled token
  return TokenStats(
      divergence=divergence, student_logp=s_tgt, teacher_logp=t_tgt, student_entropy=entropy,
      student_topk_mass=s_mass, teacher_topk_mass=t_mass,
      student_tail_mass=1.0 - s_mass, teacher_tail_mass=1.0 - t_mass)


TeacherLogitFn = Callable[[PyTree, PyTree], Array]
"""(teacher hidden chunk, teacher unembed) -> teacher logits [B, C, V]; both may be pytrees."""


def linear_logits(hidden: Array, unembed: Array) -> Array:
  """hidden [..., D] @ unembed [D, V], accumulated in at least float32.

  With bfloat16 (or float16) hidden and unembed, the backward products take the float32
  logit cotangent rounded to that dtype, as every other matmul of the model does: left to
  autodiff, the mixed float32 x bfloat16 products ran as float32 (TF32) GEMMs, 40 ms of the
  1B train step on an H100 (experiments/README.md). Accumulation stays float32.
  """
  if hidden.dtype == unembed.dtype and jnp.finfo(hidden.dtype).bits < 32:
    return _low_precision_logits(hidden, unembed)
  out = jnp.promote_types(jnp.result_type(hidden, unembed), jnp.float32)
  return jnp.einsum("...d,dv->...v", hidden, unembed, preferred_element_type=out)


@jax.custom_vjp
def _low_precision_logits(hidden: Array, unembed: Array) -> Array:
  return jnp.einsum("...d,dv->...v", hidden, unembed, preferred_element_type=jnp.float32)


def _low_precision_logits_fwd(hidden, unembed):
  return _low_precision_logits(hidden, unembed), (hidden, unembed)


def _low_precision_logits_bwd(residuals, g):
  hidden, unembed = residuals
  g = g.astype(hidden.dtype)
  d_hidden = jnp.einsum("...v,dv->...d", g, unembed, preferred_element_type=jnp.float32)
  d_unembed = jnp.einsum("...d,...v->dv", hidden, g, preferred_element_type=jnp.float32)
  return d_hidden.astype(hidden.dtype), d_unembed.astype(unembed.dtype)


_low_precision_logits.defvjp(_low_precision_logits_fwd, _low_precision_logits_bwd)


def trust_region_logit_fn(rate: float) -> TeacherLogitFn:
  """Trust-region teacher: lerp(initial-model logits, current-student logits, rate).

  Pass teacher_hidden = (h_initial, h_student) and teacher_unembed = (W_initial, W_student);
  the student's pair is treated as teacher (no gradient) like every teacher input.
  """
  def logits(hidden: tuple[Array, Array], unembed: tuple[Array, Array]) -> Array:
    initial = linear_logits(hidden[0], unembed[0])
    current = linear_logits(hidden[1], unembed[1])
    return initial + rate * (current - initial)
  return logits


def map_sequence_chunks(
    fn: Callable[[PyTree, PyTree], PyTree],
    seq_inputs: PyTree,
    consts: PyTree,
    *,
    chunk_size: int,
    save_names: Sequence[str] = (),
) -> PyTree:
  """Apply fn(chunk, consts) over chunks of the sequence axis; rematerialised per chunk.

  Every leaf of `seq_inputs` is [B, T, ...]; `fn` maps a [B, C, ...] chunk to a pytree of
  [B, C, ...] outputs. T is zero-padded to a multiple of C (outputs sliced back). Chunking
  is along T, never across B, so a batch sharding passes through untouched. Each chunk runs
  under `jax.checkpoint` keeping only `save_names`: the backward pass recomputes one chunk's
  large intermediates at a time instead of stacking them for all chunks.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  t = jax.tree.leaves(seq_inputs)[0].shape[1]
  chunk = min(chunk_size, t)
  n = -(-t // chunk)
  body = jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*save_names))
  if n == 1:
    return body(seq_inputs, consts)

  def split(x: Array) -> Array:  # [B, T, ...] -> [n, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

  def merge(y: Array) -> Array:  # [n, B, C, ...] -> [B, T, ...]
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], n * chunk, *y.shape[3:])[:, :t]

  out = lax.map(lambda xs: body(xs, consts), jax.tree.map(split, seq_inputs))
  return jax.tree.map(merge, out)


def chunked_token_stats(
    student_hidden: Array,
    teacher_hidden: PyTree,
    student_unembed: Array,
    teacher_unembed: PyTree,
    targets: Array,
    *,
    top_k: int | None = 100,
    use_tail: bool = True,
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 512,
    full_logits: bool = True,
    teacher_logit_fn: TeacherLogitFn | None = None,
) -> TokenStats:
  """`TokenStats` [B, T] from final hidden states, never materialising [B, T, V].

  student_hidden [B, T, D] and student_unembed [D, V] give student logits (hidden @ W).
  teacher_hidden / teacher_unembed are passed to `teacher_logit_fn` (default
  `linear_logits`) one chunk at a time; they may be pytrees (e.g. a trust-region teacher,
  `trust_region_logit_fn`), every leaf of teacher_hidden being [B, T, ...]. The teacher gets
  `stop_gradient`. Peak memory is O(B * chunk_size * V) in both passes; in top-k and sampled
  modes the backward pass keeps the teacher's per-chunk [B, C, k + 1] categories and does not
  recompute the teacher's logits.
  """
  teacher_logit_fn = teacher_logit_fn or linear_logits
  teacher_hidden = lax.stop_gradient(teacher_hidden)
  teacher_unembed = lax.stop_gradient(teacher_unembed)

  def chunk_stats(xs, ws):
    s_h, t_h, tgt = xs
    s_w, t_w = ws
    return token_stats(
        linear_logits(s_h, s_w), teacher_logit_fn(t_h, t_w), tgt, top_k=top_k, use_tail=use_tail,
        alpha=alpha, temperature=temperature, full_logits=full_logits)

  # Saving the teacher's full-vocab categories would stack [B, T, V]: recompute those instead.
  save = _SAVED_NAMES if top_k is not None else ("mopd_teacher_target_logp",)
  return map_sequence_chunks(
      chunk_stats, (student_hidden, teacher_hidden, targets), (student_unembed, teacher_unembed),
      chunk_size=chunk_size, save_names=save)


def chunked_target_logp(
    hidden: Array, unembed: Array, targets: Array, *, temperature: float = 1.0, chunk_size: int = 512,
) -> tuple[Array, Array]:
  """(log p(targets), entropy), each [B, T], from hidden [B, T, D] without [B, T, V].

  For the baselines, which need only the student's token log-probs. Entropy has no gradient.
  """
  def chunk_logp(xs, w):
    h, tgt = xs
    logp = jax.nn.log_softmax(linear_logits(h, w) / temperature, axis=-1)
    entropy = lax.stop_gradient(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
    return jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0], entropy
  return map_sequence_chunks(chunk_logp, (hidden, targets), unembed, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------
# 3. Token weights and masks
# ---------------------------------------------------------------------------------------


def importance_weight(logp: Array, old_logp: Array, is_clip: float | None = 2.0) -> Array:
  """stopgrad(min(exp(clip(logp - old_logp, -20, 20)), is_clip)); is_clip None: no upper cap."""
  w = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
  if is_clip is not None:
    w = jnp.minimum(w, is_clip)
  return lax.stop_gradient(w)


# A mismatch correction maps (trainer_logp, sampler_logp, threshold) to
# (token weight, token keep-mask), both [B, T] and without gradient.
# No truncated-IS ("tis") entry: with one update per batch the trainer's old policy is the
# current student, so `importance_weight` against the sampler's log-probs (cap is_clip) already
# is the token-level truncated IS of the sampler/trainer mismatch (the authors' verl
# `rollout_is=token`, threshold 2, times a PPO ratio that is 1 on-policy). A second factor
# min(ratio, threshold) squared it (`DistillConfig` refuses "tis").
MismatchFn = Callable[[Array, Array, float], tuple[Array, Array]]
MISMATCH_CORRECTIONS: dict[str, MismatchFn] = {}


def _register(registry: dict, name: str):
  def deco(fn):
    if name in registry:
      raise ValueError(f"duplicate registration {name!r}")
    registry[name] = fn
    return fn
  return deco


def _mismatch_ratio(trainer_logp: Array, sampler_logp: Array) -> Array:
  return jnp.exp(jnp.clip(lax.stop_gradient(trainer_logp) - sampler_logp, -20.0, 20.0))


@_register(MISMATCH_CORRECTIONS, "mask")
def mismatch_mask(trainer_logp: Array, sampler_logp: Array, threshold: float = 2.0) -> tuple[Array, Array]:
  """Drop tokens whose trainer/sampler ratio lies outside [1/threshold, threshold] (masked IS).

  The project's default correction: tokens where the two engines disagree that much carry a
  wrong signal either way, so they are excluded (they also leave the aggregation's count).
  """
  r = _mismatch_ratio(trainer_logp, sampler_logp)
  keep = ((r <= threshold) & (r >= 1.0 / threshold)).astype(r.dtype)
  return jnp.ones_like(r), keep


def step_mean(per_token: Array, step_ids: Array, mask: Array) -> Array:
  """Replace each token's value by the masked mean over its step (same row, same step id)."""
  mask = mask.astype(per_token.dtype)
  t = per_token.shape[-1]

  def row(x, ids, m):
    sums = jax.ops.segment_sum(x * m, ids, num_segments=t)
    counts = jax.ops.segment_sum(m, ids, num_segments=t)
    return (sums / jnp.maximum(counts, 1.0))[ids]

  return jax.vmap(row)(per_token, step_ids, mask)  # vmap over rows keeps B sharded


# ---------------------------------------------------------------------------------------
# 4. Aggregation
# ---------------------------------------------------------------------------------------

# (per_token [B, T], mask [B, T], norm, denominator) -> scalar. The two seq-mean modes average over
# sequences with at least one unmasked token, so rollouts masked out whole (distill_mask = 0) do
# not dilute the mean; seq-mean-token-sum-norm divides by a constant only (count 1). Every mode
# is a sum of per-row terms over max(count, 1), the count a gradient-free function of the mask
# (`AGG_DENOMINATORS`). `denominator` overrides that count: the whole batch's count makes a slice
# of rows give its share of the batch's loss, and 1 gives the plain sum (gradient accumulation
# over micro-batches, `train_step`).
AggFn = Callable[[Array, Array, float | None, Array | float | None], Array]
LOSS_AGGREGATIONS: dict[str, AggFn] = {}
AGG_DENOMINATORS: dict[str, Callable[[Array], Array]] = {}


def token_count(mask: Array) -> Array:
  """Unmasked tokens: the denominator of token-mean."""
  return jnp.sum(mask)


def sequence_count(mask: Array) -> Array:
  """Sequences with at least one unmasked token: the denominator of seq-mean-token-sum and
  seq-mean-token-mean."""
  return jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(mask.dtype))


def unit_count(mask: Array) -> Array:
  """1: the count of seq-mean-token-sum-norm, whose divisor is the constant `norm` alone."""
  return jnp.ones((), mask.dtype)


def _register_agg(name: str, denominator: Callable[[Array], Array]):
  def deco(fn):
    AGG_DENOMINATORS[name] = denominator
    return _register(LOSS_AGGREGATIONS, name)(fn)
  return deco


def _seq_mean(seq_values: Array, mask: Array, denominator: Array | float | None = None) -> Array:
  valid = (jnp.sum(mask, axis=-1) > 0).astype(seq_values.dtype)
  count = jnp.sum(valid) if denominator is None else denominator
  return jnp.sum(seq_values * valid) / jnp.maximum(count, 1.0)


@_register_agg("token-mean", token_count)
def agg_token_mean(per_token: Array, mask: Array, norm: float | None = None,
                   denominator: Array | float | None = None) -> Array:
  """Mean over all unmasked tokens of the batch."""
  count = jnp.sum(mask) if denominator is None else denominator
  return jnp.sum(per_token * mask) / jnp.maximum(count, 1.0)


@_register_agg("seq-mean-token-sum", sequence_count)
def agg_seq_mean_token_sum(per_token: Array, mask: Array, norm: float | None = None,
                           denominator: Array | float | None = None) -> Array:
  """Mean over sequences of each sequence's token sum."""
  return _seq_mean(jnp.sum(per_token * mask, axis=-1), mask, denominator)


@_register_agg("seq-mean-token-mean", sequence_count)
def agg_seq_mean_token_mean(per_token: Array, mask: Array, norm: float | None = None,
                            denominator: Array | float | None = None) -> Array:
  """Mean over sequences of each sequence's token mean."""
  sums = jnp.sum(per_token * mask, axis=-1)
  return _seq_mean(sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0), mask, denominator)


def row_count(mask: Array) -> Array:
  """Every row, masked out whole or not: the denominator of seq-mean-token-mean-all-rows."""
  return jnp.asarray(mask.shape[0], mask.dtype)


@_register_agg("seq-mean-token-mean-all-rows", row_count)
def agg_seq_mean_token_mean_all_rows(per_token: Array, mask: Array, norm: float | None = None,
                                     denominator: Array | float | None = None) -> Array:
  """Mean over *every* row of each row's token mean; a row masked out whole adds 0 but counts.

  What the authors' verl runs compute (docs/SPEC_VS_AUTHORS.md): ppo_micro_batch_size_per_gpu=1
  makes their token-mean a per-sequence mean (a masked-out sequence gives 0 / max(0, 1)), and
  each micro-batch's loss is scaled by 1 / the mini-batch's rows. seq-mean-token-mean differs
  only in leaving masked-out rows (distill_mask = 0) out of the count.
  """
  sums = jnp.sum(per_token * mask, axis=-1)
  count = per_token.shape[0] if denominator is None else denominator
  return jnp.sum(sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)) / jnp.maximum(count, 1.0)


@_register_agg("seq-mean-token-sum-norm", unit_count)
def agg_seq_mean_token_sum_norm(per_token: Array, mask: Array, norm: float | None = None,
                                denominator: Array | float | None = None) -> Array:
  """Sum over sequences of each one's token sum, divided by `norm` (default the padded length T).

  verl's `agg_loss` (Dr. GRPO), despite the name: no division by the number of sequences, which
  varies from step to step, only by the constant. `denominator` (1 for a whole batch) keeps the
  interface of the other modes: a slice of rows with the batch's count 1 gives its share.
  """
  norm = float(per_token.shape[-1]) if norm is None else float(norm)
  count = 1.0 if denominator is None else denominator
  return jnp.sum(per_token * mask) / norm / jnp.maximum(count, 1.0)


def aggregate_loss(per_token: Array, mask: Array, mode: str = "token-mean", norm: float | None = None,
                   denominator: Array | float | None = None) -> Array:
  """Reduce a per-token loss [B, T] under mask to a scalar with a registered mode.

  `denominator`: the count to divide by instead of this mask's (`agg_denominator`).
  """
  if mode not in LOSS_AGGREGATIONS:
    raise ValueError(f"loss_agg: unknown mode {mode!r}; known: {sorted(LOSS_AGGREGATIONS)}")
  return LOSS_AGGREGATIONS[mode](per_token, mask.astype(per_token.dtype), norm, denominator)


def agg_denominator(mode: str, mask: Array) -> Array:
  """The count `aggregate_loss(..., mode)` divides by (before the clamp at 1), from the mask."""
  if mode not in AGG_DENOMINATORS:
    raise ValueError(f"loss_agg: unknown mode {mode!r}; known: {sorted(AGG_DENOMINATORS)}")
  mask = jnp.asarray(mask)
  if not jnp.issubdtype(mask.dtype, jnp.floating):
    mask = mask.astype(jnp.float32)
  return AGG_DENOMINATORS[mode](mask)


def masked_mean(x: Array, mask: Array, denominator: Array | float | None = None) -> Array:
  count = jnp.sum(mask) if denominator is None else denominator
  return jnp.sum(x * mask) / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------
# 5. The MOPD distillation loss
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Options of MOPD_SPEC.md section 3 (defaults: the paper's). Hashable: a static jit arg."""

  alpha: float = 0.5
  top_k: int | None = 100
  use_tail: bool = True
  full_logits: bool = True  # False: sampled-token reverse-KL policy gradient (alpha must be 1)
  temperature: float = 1.0
  is_clip: float | None = 2.0  # None: no cap on the importance weight
  mismatch: str | None = None  # None | "mask" (MISMATCH_CORRECTIONS); no "tis": it is is_clip
  mismatch_threshold: float = 2.0
  step_level: bool = False  # needs DistillBatch.step_ids
  loss_agg: str = "token-mean"
  agg_norm: float | None = None  # the constant seq-mean-token-sum-norm divides by; None: padded T
  # Sequence positions per logits chunk. Loss + gradient peak memory is about
  # 4.3 * B * chunk_size * V * 4 bytes (measured: 0.67 GB at B = 1, C = 256, V = 151936).
  chunk_size: int = 512

  def __post_init__(self):
    fields.check(self, _DISTILL_RULES)
    problem = functools.partial(fields.FieldError, "DistillConfig")
    if not self.full_logits and self.alpha != 1.0:
      raise problem("full_logits", f"False (sampled-token mode) needs alpha=1, got alpha={self.alpha}")
    if self.mismatch == "tis":
      raise problem("mismatch",
          "'tis' is not offered: the importance weight min(p_student / p_sampler, is_clip) already is the "
          "token-level truncated IS correction of the sampler/trainer mismatch (one update per step, so the "
          "trainer's old policy is the current student; the authors ran verl's rollout_is=token at threshold 2), "
          "and 'tis' would apply it twice (the weight squared). Set is_clip for its threshold, or "
          "mismatch='mask' to drop the tokens where sampler and trainer disagree")
    if self.mismatch is not None and self.mismatch not in MISMATCH_CORRECTIONS:
      known = ", ".join(repr(k) for k in sorted(MISMATCH_CORRECTIONS))
      raise problem("mismatch", f"unknown {self.mismatch!r}; known: '' (off), {known}")


_DISTILL_RULES = {
    "alpha": fields.UNIT, "top_k": fields.Num(int, ge=1, also=(None,)), "use_tail": fields.Flag(),
    "full_logits": fields.Flag(), "temperature": fields.POS, "is_clip": fields.Num(float, gt=0, also=(None,)),
    "mismatch": fields.Text(also=(None,)), "mismatch_threshold": fields.Num(float, gt=1),
    "step_level": fields.Flag(), "loss_agg": fields.Text(lambda: LOSS_AGGREGATIONS),
    "agg_norm": fields.Num(float, gt=0, also=(None,)), "chunk_size": fields.COUNT,
}


@flax.struct.dataclass
class DistillBatch:
  """Per-token inputs of the distillation loss besides the hidden states.

  `old_logp` is the log-prob under the policy that sampled (the sampler's), for the
  importance weight; None: weight 1. `trainer_old_logp` is the trainer's log-prob of the
  same policy, for the mismatch correction; None: the current student's (exact for the
  first update on a batch, the on-policy case).
  """

  targets: Array  # [B, T] int: the token that hidden[:, t] predicts
  response_mask: Array  # [B, T] 1 on response tokens
  distill_mask: Array  # [B] (or [B, T]) 0: the rollout's teacher context got no peer and no feedback
  old_logp: Array | None = None  # [B, T]
  trainer_old_logp: Array | None = None  # [B, T]
  step_ids: Array | None = None  # [B, T] int, for step_level (`batching.step_ids_from_text_offsets`)


@flax.struct.dataclass
class DistillMetrics:
  """Scalars; token means are over the final loss mask."""

  loss: Array
  divergence: Array  # mean per-token divergence (sampled mode: mean log p_s(y) - log p_t(y))
  student_entropy: Array
  student_logp: Array
  teacher_logp: Array
  student_topk_mass: Array
  teacher_topk_mass: Array
  student_tail_mass: Array
  teacher_tail_mass: Array
  is_weight: Array  # mean importance weight
  is_clipped_frac: Array  # fraction of tokens whose weight hit is_clip
  mismatch_masked_frac: Array  # fraction of response tokens dropped by the mismatch mask
  masked_frac: Array  # fraction of response tokens outside the final mask
  num_tokens: Array  # tokens in the final mask


@dataclasses.dataclass(frozen=True)
class _MopdTerms:
  """What the MOPD loss and its metrics read, per token [B, T]."""

  per_token: Array  # weighted (and step-averaged) loss term
  mask: Array  # final loss mask: response x distill x mismatch keep
  response: Array
  weight: Array
  is_clipped: Array
  mismatch_keep: Array


def _mopd_terms(stats: TokenStats, batch: DistillBatch, config: DistillConfig) -> _MopdTerms:
  dtype = stats.divergence.dtype
  response = batch.response_mask.astype(dtype)
  distill = batch.distill_mask.astype(dtype)
  mask = response * (distill[:, None] if distill.ndim == 1 else distill)

  if config.full_logits:
    per_token = stats.divergence
  else:
    # Reverse KL as a policy gradient: REINFORCE with reward -(log p_s - log p_t).
    per_token = lax.stop_gradient(stats.divergence) * stats.student_logp

  weight = jnp.ones_like(per_token)
  is_clipped = jnp.zeros_like(per_token)
  if batch.old_logp is not None:
    weight = importance_weight(stats.student_logp, batch.old_logp, config.is_clip)
    if config.is_clip is not None:
      is_clipped = (weight >= config.is_clip).astype(dtype)

  mismatch_keep = jnp.ones_like(per_token)
  if config.mismatch is not None:
    if batch.old_logp is None:
      raise ValueError("DistillConfig.mismatch needs DistillBatch.old_logp (the sampler's log-probs)")
    trainer = stats.student_logp if batch.trainer_old_logp is None else batch.trainer_old_logp
    mw, mismatch_keep = MISMATCH_CORRECTIONS[config.mismatch](trainer, batch.old_logp, config.mismatch_threshold)
    weight = weight * mw
    mask = mask * mismatch_keep

  per_token = per_token * weight
  if config.step_level:
    if batch.step_ids is None:
      raise ValueError("DistillConfig.step_level needs DistillBatch.step_ids")
    per_token = step_mean(per_token, batch.step_ids, mask)
  return _MopdTerms(per_token=per_token, mask=mask, response=response, weight=weight, is_clipped=is_clipped,
                    mismatch_keep=mismatch_keep)


def mopd_loss_from_stats(
    stats: TokenStats, batch: DistillBatch, config: DistillConfig, denominator: Array | float | None = None,
) -> tuple[Array, DistillMetrics]:
  """The MOPD loss from per-token stats: weights, masks, step averaging, aggregation.

  `denominator`: the aggregation's count to divide by instead of this batch's
  (`mopd_loss_denominator` of the whole batch: micro-batches; see `aggregate_loss`).
  """
  terms = _mopd_terms(stats, batch, config)
  mask, response = terms.mask, terms.response
  loss = aggregate_loss(terms.per_token, mask, config.loss_agg, config.agg_norm, denominator)

  mean = lambda x: masked_mean(lax.stop_gradient(x), mask)
  n_response = jnp.maximum(jnp.sum(response), 1.0)
  metrics = DistillMetrics(
      loss=lax.stop_gradient(loss),
      divergence=mean(stats.divergence),
      student_entropy=mean(stats.student_entropy),
      student_logp=mean(stats.student_logp),
      teacher_logp=mean(stats.teacher_logp),
      student_topk_mass=mean(stats.student_topk_mass),
      teacher_topk_mass=mean(stats.teacher_topk_mass),
      student_tail_mass=mean(stats.student_tail_mass),
      teacher_tail_mass=mean(stats.teacher_tail_mass),
      is_weight=mean(terms.weight),
      is_clipped_frac=mean(terms.is_clipped),
      mismatch_masked_frac=jnp.sum(response * (1.0 - terms.mismatch_keep)) / n_response,
      masked_frac=1.0 - jnp.sum(mask) / n_response,
      num_tokens=jnp.sum(mask))
  return loss, metrics


def distill_token_stats(
    student_hidden: Array, teacher_hidden: PyTree, student_unembed: Array, teacher_unembed: PyTree, targets: Array,
    config: DistillConfig, teacher_logit_fn: TeacherLogitFn | None = None,
) -> TokenStats:
  """`chunked_token_stats` with the options of `config`: the per-token values the MOPD loss
  (`mopd_loss_from_stats`) reads. Gradients reach the student's hidden states and unembedding only."""
  return chunked_token_stats(
      student_hidden, teacher_hidden, student_unembed, teacher_unembed, targets,
      top_k=config.top_k if config.full_logits else None, use_tail=config.use_tail, alpha=config.alpha,
      temperature=config.temperature, chunk_size=config.chunk_size, full_logits=config.full_logits,
      teacher_logit_fn=teacher_logit_fn)


def mopd_loss_denominator(stats: TokenStats, batch: DistillBatch, config: DistillConfig) -> Array:
  """The count `mopd_loss_from_stats` divides by on this batch (no gradient). With
  `mismatch="mask"` it depends on the student's log-probs (`stats.student_logp`)."""
  return lax.stop_gradient(agg_denominator(config.loss_agg, _mopd_terms(stats, batch, config).mask))


# ---------------------------------------------------------------------------------------
# 6. Baselines: GRPO, on-policy DPO / SimPO, verified-success SFT
# ---------------------------------------------------------------------------------------
# Each takes the current policy's per-token log-probs `logp` [B, T] (with gradient; see
# `chunked_target_logp`), a typed batch, a static config and an optional `denominator` (the
# count to divide by instead of this batch's, as in `aggregate_loss`); returns (loss, metrics).
# Each `*_denominator(batch, config)` is that count on a batch (no gradient).


def group_advantages(rewards: Array, *, normalize_std: bool = True, eps: float = 1e-6) -> Array:
  """GRPO advantages [num_groups, G]: (r - group mean) / (group std + eps), std unbiased.

  Unbiased std (ddof = 1) as in the reference GRPO implementations; a group of one gets 0.
  """
  rewards = jnp.asarray(rewards)
  adv = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if rewards.shape[-1] < 2:
    return jnp.zeros_like(adv)
  if normalize_std:
    adv = adv / (jnp.std(rewards, axis=-1, keepdims=True, ddof=1) + eps)
  return adv


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """PPO-clip options (defaults: the authors' GRPO baseline, verl's compute_policy_loss_vanilla
  with clip_ratio_low 0.2, clip_ratio_high 0.28 and clip_ratio_c 3). Hashable."""

  clip_eps: float = 0.2  # clip-low: the ratio is clipped below at 1 - clip_eps
  clip_high: float = 0.28  # the ratio is clipped above at 1 + clip_high ("clip-higher")
  # Dual clip: for negative advantages the loss is capped at -A * clip_c (> 1), so a token the
  # policy now makes far likelier than the sampler did cannot push with an unbounded ratio. None: off.
  clip_c: float | None = 3.0
  kl_coef: float = 0.001  # k3 KL to the reference; used when GRPOBatch.ref_logp is given
  use_kl: bool = False  # the step runs the reference model and passes GRPOBatch.ref_logp
  normalize_std: bool = True  # advantages divided by the group's std (`group_advantages`)
  loss_agg: str = "token-mean"
  agg_norm: float | None = None

  def __post_init__(self):
    fields.check(self, {
        "clip_eps": fields.POS, "clip_high": fields.POS,
        "clip_c": fields.Num(float, gt=1, also=(None,), doc="> 1 (dual clip) or None (off), a finite number"),
        "kl_coef": fields.NONNEG, "use_kl": fields.Flag(), "normalize_std": fields.Flag(),
        "loss_agg": fields.Text(lambda: LOSS_AGGREGATIONS), "agg_norm": fields.Num(float, gt=0, also=(None,))})


@flax.struct.dataclass
class GRPOBatch:
  old_logp: Array  # [B, T] log-probs of the policy that sampled
  advantages: Array  # [B] per rollout (`group_advantages(...).reshape(-1)`)
  response_mask: Array  # [B, T]
  ref_logp: Array | None = None  # [B, T] initial/reference model; None: no KL term


@flax.struct.dataclass
class GRPOMetrics:
  loss: Array
  pg_loss: Array
  kl: Array  # mean k3 KL (0 without ref_logp)
  clip_frac: Array  # fraction of tokens where the clipped term was active
  dual_clip_frac: Array  # fraction of tokens capped at -A * clip_c (negative advantages)
  ratio: Array  # mean ratio


def k3_kl(logp: Array, ref_logp: Array) -> Array:
  """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10]."""
  d = jnp.clip(ref_logp - logp, -20.0, 20.0)
  return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def grpo_loss(
    logp: Array, batch: GRPOBatch, config: GRPOConfig = GRPOConfig(), denominator: Array | float | None = None,
) -> tuple[Array, GRPOMetrics]:
  """PPO clipped-ratio loss with group advantages, plus optional k3 KL to the reference.

  Per token: max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_high)); with clip_c and A < 0, then
  min(that, -A clip_c) (dual clip).
  """
  mask = batch.response_mask.astype(logp.dtype)
  ratio = jnp.exp(jnp.clip(logp - batch.old_logp, -20.0, 20.0))
  adv = batch.advantages.astype(logp.dtype)[:, None]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_high)
  pg = jnp.maximum(unclipped, clipped)
  dual_clipped = jnp.zeros_like(pg)
  if config.clip_c is not None:
    cap = -adv * config.clip_c
    dual_clipped = ((adv < 0) & (pg > cap)).astype(pg.dtype)
    pg = jnp.where(adv < 0, jnp.minimum(pg, cap), pg)
  pg_loss = aggregate_loss(pg, mask, config.loss_agg, config.agg_norm, denominator)
  kl = jnp.zeros((), logp.dtype)
  loss = pg_loss
  if batch.ref_logp is not None:
    kl = aggregate_loss(k3_kl(logp, batch.ref_logp), mask, config.loss_agg, config.agg_norm, denominator)
    loss = pg_loss + config.kl_coef * kl
  sg = lax.stop_gradient
  metrics = GRPOMetrics(
      loss=sg(loss), pg_loss=sg(pg_loss), kl=sg(kl),
      clip_frac=masked_mean(sg((clipped > unclipped).astype(logp.dtype)), mask),
      dual_clip_frac=masked_mean(sg(dual_clipped), mask), ratio=masked_mean(sg(ratio), mask))
  return loss, metrics


def grpo_loss_denominator(batch: GRPOBatch, config: GRPOConfig = GRPOConfig()) -> Array:
  return agg_denominator(config.loss_agg, batch.response_mask)


@flax.struct.dataclass
class PreferenceBatch:
  response_mask: Array  # [B, T]
  chosen: Array  # [P] int rollout indices
  rejected: Array  # [P]
  pair_mask: Array  # [P] 1 = real pair, 0 = padding
  ref_seq_logp: Array | None = None  # [B] reference model's summed response log-prob (DPO)


def preference_pairs(rewards: Array, group_size: int, max_pairs_per_group: int = 1) -> tuple[Array, Array, Array]:
  """(chosen, rejected, pair_mask), each [num_groups * pairs] with pairs = min(max_pairs_per_group, G // 2).

  rewards [B] with B = num_groups * G, rollout (g, i) at flat index g * G + i. Per group the
  j-th best rollout is paired with the j-th worst; a pair is real (mask 1) when the better one's
  reward is strictly higher. Ties keep index order (stable sort): pairs are deterministic.
  """
  g = group_size
  rewards = rewards.reshape(-1, g)
  order = jnp.argsort(-rewards, axis=1, stable=True)  # best first
  base = (jnp.arange(rewards.shape[0]) * g)[:, None]
  pairs = min(max_pairs_per_group, g // 2)
  hi, lo = order[:, :pairs], order[:, ::-1][:, :pairs]
  margin = jnp.take_along_axis(rewards, hi, 1) - jnp.take_along_axis(rewards, lo, 1)
  return (base + hi).reshape(-1), (base + lo).reshape(-1), (margin > 0).astype(jnp.float32).reshape(-1)


_PAIRS_RULE = fields.COUNT


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  beta: float = 0.1
  max_pairs_per_group: int = 1  # best j-th vs worst j-th rollout, j < this (and < G / 2)

  def __post_init__(self):
    fields.check(self, {"beta": fields.POS, "max_pairs_per_group": _PAIRS_RULE})


@dataclasses.dataclass(frozen=True)
class SimPOConfig:
  beta: float = 2.0
  gamma: float = 1.0  # target reward margin (SimPO paper: gamma / beta = 0.5)
  max_pairs_per_group: int = 1

  def __post_init__(self):
    fields.check(self, {"beta": fields.POS, "gamma": fields.NONNEG, "max_pairs_per_group": _PAIRS_RULE})


@flax.struct.dataclass
class PreferenceMetrics:
  loss: Array
  margin: Array  # mean implicit-reward margin (the logit inside the sigmoid)
  accuracy: Array  # fraction of pairs with a positive margin
  num_pairs: Array


def sequence_logp(logp: Array, mask: Array) -> Array:
  """Summed response log-prob per rollout [B]."""
  return jnp.sum(logp * mask.astype(logp.dtype), axis=-1)


def _pair_loss(margin: Array, pair_mask: Array, denominator: Array | float | None) -> tuple[Array, PreferenceMetrics]:
  m = pair_mask.astype(margin.dtype)
  loss = masked_mean(-jax.nn.log_sigmoid(margin), m, denominator)
  sg = lax.stop_gradient
  return loss, PreferenceMetrics(
      loss=sg(loss), margin=masked_mean(sg(margin), m),
      accuracy=masked_mean((sg(margin) > 0).astype(margin.dtype), m), num_pairs=jnp.sum(m))


def dpo_loss(
    logp: Array, batch: PreferenceBatch, config: DPOConfig = DPOConfig(), denominator: Array | float | None = None,
) -> tuple[Array, PreferenceMetrics]:
  """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) on summed sequence log-probs."""
  if batch.ref_seq_logp is None:
    raise ValueError("dpo_loss needs PreferenceBatch.ref_seq_logp")
  seq = sequence_logp(logp, batch.response_mask) - lax.stop_gradient(batch.ref_seq_logp)
  margin = config.beta * (seq[batch.chosen] - seq[batch.rejected])
  return _pair_loss(margin, batch.pair_mask, denominator)


def simpo_loss(
    logp: Array, batch: PreferenceBatch, config: SimPOConfig = SimPOConfig(),
    denominator: Array | float | None = None,
) -> tuple[Array, PreferenceMetrics]:
  """-log sigmoid(beta (mean logp_c - mean logp_r) - gamma): length-normalised, no reference."""
  mask = batch.response_mask.astype(logp.dtype)
  avg = sequence_logp(logp, mask) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  margin = config.beta * (avg[batch.chosen] - avg[batch.rejected]) - config.gamma
  return _pair_loss(margin, batch.pair_mask, denominator)


def pair_loss_denominator(batch: PreferenceBatch, config: Any = None) -> Array:
  """Real pairs: the denominator of DPO and SimPO."""
  return jnp.sum(batch.pair_mask.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  pass


@flax.struct.dataclass
class SFTBatch:
  response_mask: Array  # [B, T]
  success: Array  # [B] 1 for verified successes


@flax.struct.dataclass
class SFTMetrics:
  loss: Array
  num_tokens: Array
  num_sequences: Array


def sft_loss(
    logp: Array, batch: SFTBatch, config: SFTConfig = SFTConfig(), denominator: Array | float | None = None,
) -> tuple[Array, SFTMetrics]:
  """Token-mean NLL over the responses of successful rollouts only."""
  success = batch.success.astype(logp.dtype)
  mask = batch.response_mask.astype(logp.dtype) * success[:, None]
  loss = agg_token_mean(-logp, mask, denominator=denominator)
  return loss, SFTMetrics(loss=lax.stop_gradient(loss), num_tokens=jnp.sum(mask), num_sequences=jnp.sum(success))


def sft_loss_denominator(batch: SFTBatch, config: SFTConfig = SFTConfig()) -> Array:
  success = batch.success.astype(jnp.float32)
  return token_count(batch.response_mask.astype(jnp.float32) * success[:, None])
