"""Teacher scoring of responses as continuations of contexts, each distinct context encoded once.

    result = score_pairs((graphdef, state), [(context_tokens, response_tokens), ...],
                         params=ScoringParams(temperature=1.0))
    result.sum_logprob, result.mean_logprob, result.token_logprobs[j]

The teacher-signal analysis scores G responses of a prompt under many teacher contexts; many
(context, response) pairs share a context (every response under the plain prompt; every
failure under the same first success, ...). Scoring each pair with one forward over
`context + response` costs (pairs x context length). Here each distinct context is prefilled
once into a KV cache, and each response attends to a copy of its context's cache rows, so the
cost is (distinct contexts x context length + pairs x response length).

How `score_with_reuse` runs
1. Host: distinct contexts are sorted by length (so a batch's bucket wastes little padding)
   and cut into batches of `context_batch` rows, left-padded to a *context bucket*: every row
   then ends at the same cache slot, which is how the model's cache writes (one slot index,
   `KVCache.index`, for all rows).
2. `_prefill_contexts` (jit): one forward over [C, Lc] into a cache of exactly Lc slots; keeps
   the final hidden state of each context's last token (it predicts response token 0).
3. For each batch of `response_batch` responses of those contexts (right-padded to a
   *response bucket*), `_score_continuations` (jit) gathers each response's context row of the
   cache (a gather, not `repeat_rows`: contexts have different numbers of responses), widens
   it by Lr empty slots, runs one forward over the responses with the cache, and returns the
   log-probs of the response tokens at `temperature`, computed in sequence chunks without
   materialising [R, Lr, V] (`losses.chunked_target_logp`).
Every batch of a call has the same row count (`context_batch` / `response_batch`, or the next
power of two for smaller calls), so a call compiles one program per bucket (pair); only the
last, partial batch of each context batch is padded, so large `context_batch` wastes less.

`score_full` is the naive reference: one forward over [context | response] per pair.
Both return a `ScoreResult`; they agree to float32 rounding (tests check 1e-4).

Under a `mesh`, rows are sharded over data x fsdp (row counts are padded to a multiple of the
shard count) and params must already be placed with `sharding.shard_params`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mopd_jax import losses, sharding
from mopd_jax.models.transformer import (
    KVCache, Transformer, left_padded_segments, positions_from_segments, right_padded_segments)
from mopd_jax.sampling import power_of_two_buckets

Array = jax.Array
ModelLike = Union[Transformer, tuple[nnx.GraphDef, nnx.State]]
Tokens = Sequence[int]
# progress(done_responses, total_responses): called after every response batch.
ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ScoringParams:
  """How to batch and pad. Hashable; only `temperature` and `chunk_size` are compiled in (with
  the row counts and buckets as shapes)."""

  temperature: float = 1.0  # teacher temperature (spec: = the student's sampling temperature)
  context_buckets: tuple[int, ...] = power_of_two_buckets(16, 16384)
  response_buckets: tuple[int, ...] = power_of_two_buckets(16, 16384)
  context_batch: int = 8  # contexts per prefill call
  response_batch: int = 16  # responses per continuation forward (rows of the copied cache)
  chunk_size: int = 256  # sequence chunk of the vocabulary projection
  pad_id: int = 0

  def __post_init__(self):
    for name in ("context_buckets", "response_buckets"):
      buckets = tuple(getattr(self, name))
      object.__setattr__(self, name, buckets)
      if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"ScoringParams.{name} must be strictly increasing ints >= 1, got {buckets!r}")
    for name in ("context_batch", "response_batch", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"ScoringParams.{name} must be >= 1, got {getattr(self, name)!r}")
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      raise ValueError(f"ScoringParams.temperature must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreResult:
  """Scores of N responses, in the order they were given.

  The mean of an empty response is 0 (so it stays finite); its sum is 0 as well.
  """

  token_logprobs: tuple[np.ndarray, ...]  # [N], response j: [len_j] float32
  sum_logprob: np.ndarray  # [N] float64
  mean_logprob: np.ndarray  # [N] float64, sum / max(len, 1)
  response_lengths: np.ndarray  # [N] int32
  context_lengths: np.ndarray  # [N] int32, tokens of the context each response was scored under
  num_contexts: int  # distinct contexts encoded (score_full: one per pair)
  num_pairs: int  # forward rows over responses (distinct pairs)
  seconds: float  # wall time of the call, compilation included

  @property
  def num_responses(self) -> int:
    return len(self.token_logprobs)


# ------------------------------------------------------------------------------ jitted parts


@flax.struct.dataclass
class _Contexts:
  cache: KVCache  # [C] rows, Lc slots, index = Lc
  last_hidden: Array  # [C, D] final hidden state of each context's last token


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _prefill_contexts(graphdef: nnx.GraphDef, state: nnx.State, tokens: Array, lengths: Array, *,
                      mesh: Optional[Mesh]) -> _Contexts:
  """tokens [C, Lc] left-padded, lengths [C] -> each context's cache and last hidden state."""
  model = nnx.merge(graphdef, state)
  c, lc = tokens.shape
  segments = left_padded_segments(lengths, lc)
  cache = sharding.constrain_cache(KVCache.empty(model.config, c, lc), mesh, model.config.num_kv_heads)
  with sharding.activation_mesh(mesh):
    out = model(tokens, positions_from_segments(segments), segments, cache, return_logits=False, fresh_cache=True)
  cache = sharding.constrain_cache(out.cache, mesh, model.config.num_kv_heads)
  return _Contexts(cache=cache, last_hidden=sharding.constrain(out.hidden[:, -1], mesh))


def _gather_rows(cache: KVCache, rows: Array, extra_slots: int) -> KVCache:
  """Cache row rows[r] for every response r, with `extra_slots` empty slots appended."""
  def take(x: Array, row_axis: int, slot_axis: int) -> Array:
    x = jnp.take(x, rows, axis=row_axis)
    pad = [(0, 0)] * x.ndim
    pad[slot_axis] = (0, extra_slots)
    return jnp.pad(x, pad)
  # The padded slots have segment 0 (empty) until the responses write them.
  kv = lambda x: take(x, row_axis=1, slot_axis=3)  # [L, B, KVH, S, D]
  return KVCache(keys=kv(cache.keys), values=kv(cache.values),
                 segment_ids=take(cache.segment_ids, row_axis=0, slot_axis=1), index=cache.index)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk_size", "mesh"))
def _score_continuations(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    contexts: _Contexts,
    rows: Array,  # [R] int32: the context row of each response
    context_lengths: Array,  # [R] int32: its context's length (RoPE offset)
    tokens: Array,  # [R, Lr] int32, right-padded
    lengths: Array,  # [R] int32
    *,
    temperature: float,
    chunk_size: int,
    mesh: Optional[Mesh],
) -> Array:
  """[R, Lr] float32 log p(token t | context, tokens < t) at `temperature`; 0 on padding."""
  model = nnx.merge(graphdef, state)
  lr = tokens.shape[1]
  cache = sharding.constrain_cache(_gather_rows(contexts.cache, rows, lr), mesh, model.config.num_kv_heads)
  segments = right_padded_segments(lengths, lr)
  positions = context_lengths[:, None] + jnp.arange(lr)[None, :]
  out = model(tokens, positions, segments, cache, return_logits=False)
  # Token 0 is predicted by the context's last position, token t by response position t - 1.
  first = jnp.take(contexts.last_hidden, rows, axis=0)[:, None]
  hidden = sharding.constrain(jnp.concatenate([first, out.hidden[:, :-1]], axis=1), mesh)
  logp, _ = losses.chunked_target_logp(
      hidden, model.unembedding(), tokens, temperature=temperature, chunk_size=chunk_size)
  return jnp.where(segments > 0, logp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "response_len", "temperature", "chunk_size", "mesh"))
def _score_concatenated(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Array,  # [B, L] int32: context | response | padding
    context_lengths: Array,  # [B]
    response_lengths: Array,  # [B]
    *,
    response_len: int,  # Lr: the response bucket
    temperature: float,
    chunk_size: int,
    mesh: Optional[Mesh],
) -> Array:
  """The naive reference: one uncached forward per row -> [B, Lr] response log-probs."""
  model = nnx.merge(graphdef, state)
  length = tokens.shape[1]
  total = context_lengths + response_lengths
  segments = right_padded_segments(total, length)
  with sharding.activation_mesh(mesh):
    out = model(tokens, positions_from_segments(segments), segments, return_logits=False)
  t = jnp.arange(response_len)[None, :]
  predict_at = jnp.clip(context_lengths[:, None] - 1 + t, 0, length - 1)
  hidden = sharding.constrain(jnp.take_along_axis(out.hidden, predict_at[..., None], axis=1), mesh)
  targets = jnp.take_along_axis(tokens, jnp.clip(context_lengths[:, None] + t, 0, length - 1), axis=1)
  logp, _ = losses.chunked_target_logp(
      hidden, model.unembedding(), targets, temperature=temperature, chunk_size=chunk_size)
  return jnp.where(t < response_lengths[:, None], logp, 0.0)


# ------------------------------------------------------------------------------ host side


def _split_model(model: ModelLike) -> tuple[nnx.GraphDef, nnx.State, int]:
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
  elif isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    graphdef, state = model
  else:
    raise TypeError(f"scoring: model must be a Transformer or a (graphdef, state) pair, got {type(model)}")
  vocab = nnx.merge(graphdef, state).config.vocab_size
  return graphdef, state, vocab


def _bucket(length: int, buckets: tuple[int, ...], what: str) -> int:
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(f"scoring: a {what} has {length} tokens, more than the largest bucket {buckets[-1]} "
                   f"(ScoringParams.{what}_buckets)")


def _row_count(total: int, batch: int, shards: int) -> int:
  """Rows of every batch of a call over `total` items: `batch`, or the next power of two when
  the whole call is smaller, rounded up to a multiple of the shard count. One row count per
  call keeps compilations to one per bucket; only a batch's last partial batch is padded."""
  rows = min(batch, 1 << max(total - 1, 0).bit_length())
  return -(-rows // shards) * shards


def _check_tokens(seqs: Sequence[Tokens], vocab: int, what: str, allow_empty: bool) -> list[np.ndarray]:
  out = []
  for i, s in enumerate(seqs):
    a = np.asarray(s, dtype=np.int64).reshape(-1) if len(s) else np.zeros((0,), np.int64)
    if a.size == 0 and not allow_empty:
      raise ValueError(f"scoring: {what} {i} is empty")
    if a.size and (a.min() < 0 or a.max() >= vocab):
      raise ValueError(f"scoring: {what} {i} has token ids outside [0, {vocab})")
    out.append(a.astype(np.int32))
  return out


def _to_device(x: np.ndarray, mesh: Optional[Mesh]) -> Array:
  return jnp.asarray(x) if mesh is None else jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))


def _left_padded(seqs: Sequence[np.ndarray], rows: int, width: int, pad_id: int) -> np.ndarray:
  out = np.full((rows, width), pad_id, np.int32)
  for r, s in enumerate(seqs):
    if s.size:
      out[r, width - s.size:] = s
  return out


def _right_padded(seqs: Sequence[np.ndarray], rows: int, width: int, pad_id: int) -> np.ndarray:
  out = np.full((rows, width), pad_id, np.int32)
  for r, s in enumerate(seqs):
    out[r, :s.size] = s
  return out


def _batches(items: Sequence[int], size: int) -> list[Sequence[int]]:
  return [items[i:i + size] for i in range(0, len(items), size)]


def _result(token_logprobs: list[np.ndarray], context_lengths: np.ndarray, num_contexts: int,
            num_pairs: int, start: float) -> ScoreResult:
  lengths = np.array([lp.size for lp in token_logprobs], np.int32)
  sums = np.array([float(np.sum(lp, dtype=np.float64)) for lp in token_logprobs], np.float64)
  return ScoreResult(
      token_logprobs=tuple(token_logprobs), sum_logprob=sums, mean_logprob=sums / np.maximum(lengths, 1),
      response_lengths=lengths, context_lengths=np.asarray(context_lengths, np.int32),
      num_contexts=num_contexts, num_pairs=num_pairs, seconds=time.perf_counter() - start)


def score_with_reuse(
    model: ModelLike,
    contexts: Sequence[Tokens],
    responses: Sequence[Tokens],
    context_of: Sequence[int],
    *,
    params: ScoringParams = ScoringParams(),
    mesh: Optional[Mesh] = None,
    progress: Optional[ProgressFn] = None,
) -> ScoreResult:
  """Scores responses[j] as a continuation of contexts[context_of[j]], each context encoded once.

  contexts: non-empty token sequences (they need not be distinct, but each is encoded once per
    entry; `score_pairs` de-duplicates). responses: token sequences (may be empty).
  """
  start = time.perf_counter()
  graphdef, state, vocab = _split_model(model)
  ctx = _check_tokens(contexts, vocab, "context", allow_empty=False)
  resp = _check_tokens(responses, vocab, "response", allow_empty=True)
  context_of = np.asarray(context_of, np.int64).reshape(-1)
  if context_of.size != len(resp):
    raise ValueError(f"scoring: context_of has {context_of.size} entries for {len(resp)} responses")
  if context_of.size and (context_of.min() < 0 or context_of.max() >= len(ctx)):
    raise ValueError(f"scoring: context_of must index the {len(ctx)} contexts")
  for j, c in enumerate(context_of):  # fail before any compute
    _bucket(ctx[c].size, params.context_buckets, "context")
    _bucket(max(resp[j].size, 1), params.response_buckets, "response")
  shards = 1 if mesh is None else sharding.num_batch_shards(mesh)
  by_context: list[list[int]] = [[] for _ in ctx]
  for j, c in enumerate(context_of):
    by_context[c].append(j)
  used = [c for c in range(len(ctx)) if by_context[c]]  # a context without responses costs nothing
  order = sorted(used, key=lambda c: ctx[c].size)
  out: list[Optional[np.ndarray]] = [None] * len(resp)
  rows = _row_count(len(order), params.context_batch, shards)
  r_rows = _row_count(len(resp), params.response_batch, shards)
  done = 0
  for chunk in _batches(order, rows):
    lc = _bucket(max(ctx[c].size for c in chunk), params.context_buckets, "context")
    lengths = np.zeros((rows,), np.int32)
    lengths[:len(chunk)] = [ctx[c].size for c in chunk]
    encoded = _prefill_contexts(
        graphdef, state, _to_device(_left_padded([ctx[c] for c in chunk], rows, lc, params.pad_id), mesh),
        _to_device(lengths, mesh), mesh=mesh)
    row_of = {c: r for r, c in enumerate(chunk)}
    members = sorted((j for c in chunk for j in by_context[c]), key=lambda j: resp[j].size)
    for batch in _batches(members, r_rows):
      lr = _bucket(max(max(resp[j].size for j in batch), 1), params.response_buckets, "response")
      ctx_rows = np.zeros((r_rows,), np.int32)
      ctx_rows[:len(batch)] = [row_of[context_of[j]] for j in batch]
      resp_lengths = np.zeros((r_rows,), np.int32)
      resp_lengths[:len(batch)] = [resp[j].size for j in batch]
      logp = _score_continuations(
          graphdef, state, encoded, _to_device(ctx_rows, mesh), _to_device(lengths[ctx_rows], mesh),
          _to_device(_right_padded([resp[j] for j in batch], r_rows, lr, params.pad_id), mesh),
          _to_device(resp_lengths, mesh), temperature=float(params.temperature),
          chunk_size=params.chunk_size, mesh=mesh)
      logp = np.asarray(jax.device_get(logp))
      for r, j in enumerate(batch):
        out[j] = logp[r, :resp[j].size].copy()
      done += len(batch)
      if progress is not None:
        progress(done, len(resp))
  context_lengths = np.array([ctx[c].size for c in context_of], np.int32)
  return _result(out, context_lengths, num_contexts=len(used), num_pairs=len(resp), start=start)


def score_pairs(
    model: ModelLike,
    pairs: Sequence[tuple[Tokens, Tokens]],
    *,
    params: ScoringParams = ScoringParams(),
    mesh: Optional[Mesh] = None,
    progress: Optional[ProgressFn] = None,
) -> ScoreResult:
  """Scores each (context, response) pair; identical contexts are encoded once and identical
  pairs scored once (the result still has one entry per given pair)."""
  start = time.perf_counter()
  context_ids: dict[tuple[int, ...], int] = {}
  response_ids: dict[tuple[int, int], int] = {}  # (context id, response key) -> distinct pair
  response_keys: dict[tuple[int, ...], int] = {}
  contexts, responses, context_of, pair_of = [], [], [], []
  for context, response in pairs:
    c_key, r_key = tuple(int(t) for t in context), tuple(int(t) for t in response)
    c = context_ids.setdefault(c_key, len(context_ids))
    if c == len(contexts):
      contexts.append(c_key)
    r = response_keys.setdefault(r_key, len(response_keys))
    p = response_ids.setdefault((c, r), len(response_ids))
    if p == len(responses):
      responses.append(r_key)
      context_of.append(c)
    pair_of.append(p)
  distinct = score_with_reuse(model, contexts, responses, context_of, params=params, mesh=mesh,
                              progress=progress)
  return _result([distinct.token_logprobs[p] for p in pair_of], distinct.context_lengths[pair_of],
                 num_contexts=distinct.num_contexts, num_pairs=distinct.num_pairs, start=start)


def score_full(
    model: ModelLike,
    pairs: Sequence[tuple[Tokens, Tokens]],
    *,
    params: ScoringParams = ScoringParams(),
    batch_size: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    progress: Optional[ProgressFn] = None,
) -> ScoreResult:
  """The naive reference: every pair gets its own forward over [context | response].

  Rows are right-padded to (context bucket + response bucket); `batch_size` defaults to
  `params.response_batch`.
  """
  start = time.perf_counter()
  graphdef, state, vocab = _split_model(model)
  ctx = _check_tokens([p[0] for p in pairs], vocab, "context", allow_empty=False)
  resp = _check_tokens([p[1] for p in pairs], vocab, "response", allow_empty=True)
  shards = 1 if mesh is None else sharding.num_batch_shards(mesh)
  batch_size = batch_size or params.response_batch
  # Sorted by total length: a batch's buckets fit its rows tightly, as in score_with_reuse.
  order = sorted(range(len(ctx)), key=lambda j: (ctx[j].size, resp[j].size))
  out: list[Optional[np.ndarray]] = [None] * len(ctx)
  rows = _row_count(len(ctx), batch_size, shards)
  done = 0
  for batch in _batches(order, rows):
    lc = _bucket(max(ctx[j].size for j in batch), params.context_buckets, "context")
    lr = _bucket(max(max(resp[j].size for j in batch), 1), params.response_buckets, "response")
    seqs = [np.concatenate([ctx[j], resp[j]]) for j in batch]
    c_len = np.zeros((rows,), np.int32)
    r_len = np.zeros((rows,), np.int32)
    c_len[:len(batch)] = [ctx[j].size for j in batch]
    r_len[:len(batch)] = [resp[j].size for j in batch]
    c_len[len(batch):] = 1  # padding rows: a one-token context keeps the gathers in range
    logp = _score_concatenated(
        graphdef, state, _to_device(_right_padded(seqs, rows, lc + lr, params.pad_id), mesh),
        _to_device(c_len, mesh), _to_device(r_len, mesh), response_len=lr,
        temperature=float(params.temperature), chunk_size=params.chunk_size, mesh=mesh)
    logp = np.asarray(jax.device_get(logp))
    for r, j in enumerate(batch):
      out[j] = logp[r, :resp[j].size].copy()
    done += len(batch)
    if progress is not None:
      progress(done, len(ctx))
  return _result(out, np.array([c.size for c in ctx], np.int32), num_contexts=len(ctx),
                 num_pairs=len(ctx), start=start)
