"""Grouped rollout sampler: prefill each prompt once, decode G samples from copies of its cache.

    result = sample(model, prompts, num_samples=8, rng=jax.random.key(0),
                    sampling_params=SamplingParams(max_new_tokens=512, stop_token_ids=(eos,)))

How a call runs
1. Host: prompts are left-padded with `pad_id` to the smallest *prompt bucket* that holds
   the longest one (left padding makes every row write the same cache slot), and
   `max_new_tokens` is rounded up to a *generation bucket* (the size of the token buffers and
   of the cache's decode region). Shapes are therefore static per bucket pair: one compilation
   of `_prefill` and one of `_decode` per (buckets, batch, G, model, token rule), reused across
   calls. `max_new_tokens`, the stop token ids and `pad_id` are traced values, so they change
   freely without recompiling.
2. `_prefill` (jit): one forward pass over the B x Lp prompt tokens into a KV cache, logits of
   the last prompt position only; then each cache row and logit row is repeated G times
   (prompt b -> rows b*G .. b*G+G-1), so a group's G rows start from identical caches.
3. `_decode` (jit, cache donated): the first token of every row is sampled from the prefill
   logits (the G copies draw independent uniforms; `initial_decode_state`); then a
   `lax.while_loop` runs `decode_step` (feed the last token, sample the next one) and stops
   early once every row has emitted a stop token or reached `max_new_tokens`. Finished rows
   emit `pad_id` and are masked. `decode_step` is public and pure so that `mopd_jax.aot` can
   compile one step alone.
4. Host: stop strings are matched in the detokenised text (see `_cut_at_stop_string` for the
   token-boundary rule) and the typed `SampleResult` is built from numpy arrays.

Continuous refill (`SamplingParams.decode_rows = R`; off by default)
The loop above runs every row until the longest ends: with RL length distributions (most
responses short, a tail at `max_new_tokens`) most of its row-steps decode rows that already
ended. With R < B*G, R rows ("slots") decode at a time and a slot whose sample ended takes the
next sample (prompt-major order), by row rather than by group: a group frees its rows only
when its longest sample ends, which in real runs is nearly always at the length limit.
1. `_prefill` runs once over the B prompts (num_samples=1, prompt-bucket slots only).
2. Host loop: `_refill` starts samples in the free slots: the prompt's prefill cache is copied
   into the slot's first Lp slots (a prompt's G samples all copy its one prefill), the slot's
   other segments are cleared, its write index set to Lp (`KVCache.index` of shape [R]: one
   write slot per row) and token 0 drawn from the prompt's prefill logits; then
   `_decode_until_free` (jit, state donated) decodes every slot at its own token index until
   `refill_threshold` slots are free, or, once every sample has started, until all end.
3. Each sample writes its own row of the [B*G, N] outputs, so `_finish` is shared.
A sample draws the same uniforms (its global id, its token index) over the same cache slots
as in the one-batch loop, so the rollouts are the same: tokens, lengths and finish reasons
exactly, log-probs up to the ulp-level differences of XLA's matmul kernels between batch
sizes (which the one-batch loop shows as well with fewer prompts). It costs R x decode
iterations row-steps (`SampleResult.decode_slot_steps`) instead of B*G x (longest - 1), a host
round trip per refill, and the prompts' prefill (B x Lp slots) next to the R x (Lp + N) decode
cache (the one-batch loop holds B*G x (Lp + N)). Off by default: the last samples to start
can run alone to the limit (worse than one batch when R is close to B*G), and where a decode
step costs about the same for R rows as for B*G (an accelerator reading the weights once per
step) fewer row-steps mean more steps, not less time. Not on a mesh that spans processes.

Per generated token the sampler returns three log-probs (all float32):
- `logprobs`: under the distribution actually sampled from: log_softmax of the processed
  logits (temperature, then top-k, then top-p, renormalised). 0 for greedy decoding.
- `scaled_logprobs`: log_softmax(logits / temperature) without truncation: the "policy" the
  MOPD trainer compares against (teacher temperature = student temperature). Greedy: T = 1.
- `model_logprobs`: log_softmax(logits), no processing at all.

Randomness: the uniform of token i of row r (sample g of prompt p) is
`uniform(fold_in(fold_in(rng, p * G + g), i))`: it depends only on `rng` and the row's global
id, not on the mesh, the batch composition or the process that samples it.
Sampling is an inverse-CDF draw from one uniform per row (blocked: one pass over the vocab
plus a pass over one block), not Gumbel-max, which would draw B x V random numbers per step.
Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the same set
as sorting and cutting the cumulative sum; ties at the cut-off are all kept); it is found by
bisection on the probability threshold, 30 masked sums over [B, V] instead of a full sort
(on CPU at [64, 49152]: 33 ms vs 690 ms for the sort). Top-k uses `lax.top_k` (XLA's TopK
kernel), then samples among the k candidates.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mopd_jax import sharding
from mopd_jax.models.config import ModelConfig
from mopd_jax.models.transformer import KVCache, Transformer, left_padded_segments, positions_from_segments

Array = jax.Array
ModelLike = Union[Transformer, tuple[nnx.GraphDef, nnx.State]]


def power_of_two_buckets(lo: int, hi: int) -> tuple[int, ...]:
  """(lo, 2*lo, ..., hi) for powers of two lo <= hi."""
  return tuple(2**i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1))


class FinishReason(str, enum.Enum):
  STOP = "stop"  # emitted one of `stop_token_ids` (the stop token is kept in the response)
  LENGTH = "length"  # reached max_new_tokens
  STOP_STRING = "stop_string"  # a stop string completed (host-side, after decoding)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. Hashable. Only `temperature`, `top_p` and `top_k` are compiled into the
  decoder (and the buckets and `decode_rows` into its shapes); the rest is host-side or passed
  as traced values."""

  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # in (0, 1]; 1 = off
  top_k: Optional[int] = None  # None or 0 = off
  max_new_tokens: int = 256
  stop_token_ids: tuple[int, ...] = ()  # any of these ends a row (and is kept in it)
  pad_id: int = 0  # fills left prompt padding and finished rows
  stop_strings: tuple[str, ...] = ()  # host-side; needs `decode_fn` in `sample`
  prompt_buckets: tuple[int, ...] = power_of_two_buckets(16, 8192)
  generation_buckets: tuple[int, ...] = power_of_two_buckets(16, 8192)
  truncate_prompts_left: bool = False  # else a prompt longer than the largest bucket fails
  # Continuous refill (module docstring): None decodes all B*G rows at once until the longest
  # ends; R decodes R rows at a time, a row whose sample ended taking the next sample.
  decode_rows: Optional[int] = None
  refill_free_rows: Optional[int] = None  # refill once this many rows are free (None: decode_rows // 16, >= 1)

  def __post_init__(self):
    # Accept lists for the tuple fields; keep the object hashable.
    for name in ("stop_token_ids", "stop_strings", "prompt_buckets", "generation_buckets"):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"SamplingParams.{name} must be a sequence, got {value!r}")
      object.__setattr__(self, name, tuple(value))
    if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
    if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
    if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 0):
      raise ValueError(f"SamplingParams.top_k must be None or an int >= 0, got {self.top_k!r}")
    if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
      raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
      raise ValueError(f"SamplingParams.stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
    if not (_is_int(self.pad_id) and self.pad_id >= 0):
      raise ValueError(f"SamplingParams.pad_id must be an int >= 0, got {self.pad_id!r}")
    if not all(isinstance(s, str) and s for s in self.stop_strings):
      raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")
    for name in ("prompt_buckets", "generation_buckets"):
      buckets = getattr(self, name)
      if not buckets or not all(_is_int(b) and b >= 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"SamplingParams.{name} must be strictly increasing ints >= 1, got {buckets!r}")
    if self.max_new_tokens > self.generation_buckets[-1]:
      raise ValueError(
          f"SamplingParams.max_new_tokens={self.max_new_tokens} exceeds the largest generation "
          f"bucket {self.generation_buckets[-1]} (SamplingParams.generation_buckets)")
    for name in ("decode_rows", "refill_free_rows"):
      value = getattr(self, name)
      if value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"SamplingParams.{name} must be None or an int >= 1, got {value!r}")
    if self.refill_free_rows is not None and (self.decode_rows is None or self.refill_free_rows > self.decode_rows):
      raise ValueError(
          f"SamplingParams.refill_free_rows={self.refill_free_rows} needs decode_rows set and at least as "
          f"large (decode_rows={self.decode_rows})")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def replace(self, **changes) -> "SamplingParams":
    return dataclasses.replace(self, **changes)

  @property
  def refill_threshold(self) -> int:
    """Free rows that end a decode chunk and trigger a refill (with `decode_rows` set)."""
    return self.refill_free_rows or max(1, self.decode_rows // 16)

  def token_rule(self) -> "TokenRule":
    """The part that decides how one token is drawn (normalised, so equal rules share programs)."""
    if self.greedy:
      return TokenRule(temperature=0.0, top_p=1.0, top_k=0)
    return TokenRule(
        temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k or 0))


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TokenRule:
  """Static token-selection rule: temperature (0 = greedy), then top-k (0 = off), then top-p."""

  temperature: float
  top_p: float
  top_k: int


# ----------------------------------------------------------------------------------------------
# One sampling step on [B, V] logits.


@flax.struct.dataclass
class TokenSample:
  token: Array  # [B] int32
  logprob: Array  # [B] float32, under the processed (sampled-from) distribution
  scaled_logprob: Array  # [B] float32, log_softmax(logits / temperature)
  model_logprob: Array  # [B] float32, log_softmax(logits)


def sample_token(logits: Array, rng: Array, params: Union[SamplingParams, TokenRule]) -> TokenSample:
  """Draw one token per row of logits [B, V] (float32) under `params`."""
  rule = params.token_rule() if isinstance(params, SamplingParams) else params
  uniform = jax.random.uniform(rng, logits.shape[:1], jnp.float32)
  return sample_with_uniform(logits, uniform, rule)


def sample_with_uniform(logits: Array, uniform: Array, rule: TokenRule) -> TokenSample:
  """`sample_token` with the per-row uniforms [B] in [0, 1) given (deterministic)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=-1)[:, 0]
  if rule.temperature == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    model_lp = take(logits, token) - jax.nn.logsumexp(logits, axis=-1)
    return TokenSample(token, jnp.zeros_like(model_lp), model_lp, model_lp)

  scaled = logits if rule.temperature == 1 else logits / rule.temperature
  top_k = rule.top_k if 0 < rule.top_k < vocab else 0
  if top_k:
    candidates, candidate_ids = jax.lax.top_k(scaled, top_k)  # [B, k], descending
    scaled_lse = jax.nn.logsumexp(scaled, axis=-1)
    # max, not candidates[:, 0]: a second slice of the sort defeats XLA's rewrite of
    # sort + slice into its TopK kernel and leaves a full [B, V] sort (100x slower on CPU).
    shift = jnp.max(candidates, axis=-1)
  else:
    candidates, candidate_ids = scaled, None
    shift = jnp.max(scaled, axis=-1)
  weights = jnp.exp(candidates - shift[:, None])  # unnormalised, max 1
  if not top_k:
    # No top-k: the untruncated normaliser comes for free from the same weights.
    scaled_lse = shift + jnp.log(jnp.sum(weights, axis=-1))
  if rule.top_p < 1:
    weights = jnp.where(_nucleus_mask(weights, rule.top_p), weights, 0.0)
  choice = _inverse_cdf(weights, uniform)
  chosen = take(candidates, choice)
  logprob = chosen - shift - jnp.log(jnp.sum(weights, axis=-1))
  token = choice if candidate_ids is None else take(candidate_ids, choice)
  token = token.astype(jnp.int32)
  if rule.temperature == 1:
    model_lp = chosen - scaled_lse
  else:
    model_lp = take(logits, token) - jax.nn.logsumexp(logits, axis=-1)
  return TokenSample(token, logprob, chosen - scaled_lse, model_lp)


def _nucleus_mask(weights: Array, top_p: float) -> Array:
  """[B, n] bool: the smallest most-likely set with mass >= top_p (weights >= 0, max 1).

  Bisection over the float32 bit pattern of the threshold t (monotone for t >= 0) for the
  largest t with mass(weights >= t) >= top_p * total; 30 halvings of [0, bits(1.0)] are exact.
  """
  target = top_p * jnp.sum(weights, axis=-1)
  one_bits = int(np.float32(1.0).view(np.int32))

  def halve(_, bounds):
    lo, hi = bounds  # mass(>= lo) reaches the target, mass(>= hi) does not
    mid = lo + (hi - lo) // 2
    t = jax.lax.bitcast_convert_type(mid, jnp.float32)
    mass = jnp.sum(jnp.where(weights >= t[:, None], weights, 0.0), axis=-1)
    ok = mass >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  b = weights.shape[0]
  lo = jnp.zeros((b,), jnp.int32)
  hi = jnp.full((b,), one_bits + 1, jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 30, halve, (lo, hi))
  return weights >= jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def _last_positive(x: Array) -> Array:
  """[B, n] -> [B] index of the last entry > 0 (clamps an inverse-CDF draw that rounded past)."""
  n = x.shape[-1]
  return (n - 1 - jnp.argmax(x[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def _block_size(n: int) -> int:
  if n <= 512:
    return n
  for size in (256, 128, 64):
    if n % size == 0:
      return size
  return 256


def _inverse_cdf(weights: Array, uniform: Array) -> Array:
  """Index i with P(i) proportional to weights[b, i] >= 0, from uniform [B] in [0, 1).

  Blocked so the sequential cumulative sums are short: pick the block from the block masses,
  then the token inside that block. Zero-weight entries are never chosen.
  """
  b, n = weights.shape
  size = _block_size(n)
  padded = -(-n // size) * size
  if padded != n:
    weights = jnp.pad(weights, ((0, 0), (0, padded - n)))
  blocks = weights.reshape(b, padded // size, size)
  block_mass = jnp.sum(blocks, axis=-1)  # [B, nb]
  cum = jnp.cumsum(block_mass, axis=-1)
  target = uniform * cum[:, -1]
  j = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), _last_positive(block_mass))
  before = jnp.take_along_axis(cum - block_mass, j[:, None], axis=-1)[:, 0]
  inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, size]
  inner_cum = jnp.cumsum(inner, axis=-1)
  i = jnp.sum(inner_cum <= (target - before)[:, None], axis=-1)
  i = jnp.minimum(i, _last_positive(inner))
  return (j * size + i).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Jitted prefill and decode. Module-level jits: compiled programs are cached by the static
# arguments (graphdef, rule, buckets, mesh) and the input shapes, so repeated calls reuse them.

# How often each jitted function was traced (the Python body runs only on a cache miss): lets
# tests assert "no recompilation" without private jax APIs.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@flax.struct.dataclass
class Prefilled:
  cache: KVCache  # [B*G] rows, max_len = Lp + generation bucket, index = Lp
  logits: Array  # [B*G, V] float32, logits after the last prompt token
  positions: Array  # [B*G] int32, RoPE position of the first generated token (= prompt length)


@flax.struct.dataclass
class Decoded:
  tokens: Array  # [R, N] int32, pad after each row's end
  logprobs: Array  # [R, N] float32 (0 where masked), see module docstring
  scaled_logprobs: Array  # [R, N]
  model_logprobs: Array  # [R, N]
  lengths: Array  # [R] int32, tokens generated (a stop token included)
  stopped: Array  # [R] bool, ended by a stop token
  steps: Array  # [] int32, tokens generated by the longest row (loop iterations + 1)


@flax.struct.dataclass
class DecodeState:
  """The decode loop's carry: what one `decode_step` takes and returns."""

  step: Array  # [] int32, index of the token to generate next
  last_token: Array  # [R] int32
  out: Decoded
  done: Array  # [R] bool
  cache: KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "generation_len", "mesh"))
def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Array,  # [B, Lp] int32, left-padded
    prompt_lengths: Array,  # [B] int32
    *,
    num_samples: int,
    generation_len: int,
    mesh: Optional[Mesh],
) -> Prefilled:
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  config: ModelConfig = model.config
  b, lp = tokens.shape
  segments = left_padded_segments(prompt_lengths, lp)
  cache = KVCache.empty(config, b, lp + generation_len)
  cache = sharding.constrain_cache(cache, mesh, config.num_kv_heads)
  with sharding.activation_mesh(mesh):
    out = model(tokens, positions_from_segments(segments), segments, cache, return_logits=False, fresh_cache=True)
  # Left padding: the last slot is every row's last prompt token; only its logits are needed.
  logits = model.logits(out.hidden[:, -1:])[:, 0]
  cache = sharding.constrain_cache(out.cache.repeat_rows(num_samples), mesh, config.num_kv_heads)
  return Prefilled(
      cache=cache,
      logits=sharding.constrain(jnp.repeat(logits, num_samples, axis=0), mesh),
      positions=sharding.constrain(jnp.repeat(prompt_lengths, num_samples, axis=0), mesh))


@flax.struct.dataclass
class Limits:
  """When rows end, as traced values: changing them does not recompile."""

  max_new_tokens: Array  # [] int32, <= the generation bucket
  stop_token_ids: Array  # [_STOP_SLOTS] int32, unused slots -1
  pad_id: Array  # [] int32


_STOP_SLOTS = 8  # stop-token capacity of one program (more ids: a bigger power of two)


def limits(params: SamplingParams) -> Limits:
  ids = list(params.stop_token_ids)
  slots = max(_STOP_SLOTS, 1 << max(len(ids) - 1, 0).bit_length())
  return Limits(
      max_new_tokens=np.int32(params.max_new_tokens),
      stop_token_ids=np.array(ids + [-1] * (slots - len(ids)), np.int32),
      pad_id=np.int32(params.pad_id))


def _record(s: DecodeState, sample: TokenSample, limits: Limits, mesh: Optional[Mesh]
            ) -> DecodeState:
  """Write token `s.step` of every active row; finished rows get pad and zero log-probs."""
  active = ~s.done
  token = jnp.where(active, sample.token, limits.pad_id)
  put = lambda buf, col: sharding.constrain(
      jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, s.step)), mesh)
  zero = lambda x: jnp.where(active, x, 0.0)
  hit_stop = active & jnp.any(token[:, None] == limits.stop_token_ids[None, :], axis=-1)
  out = Decoded(
      tokens=put(s.out.tokens, token),
      logprobs=put(s.out.logprobs, zero(sample.logprob)),
      scaled_logprobs=put(s.out.scaled_logprobs, zero(sample.scaled_logprob)),
      model_logprobs=put(s.out.model_logprobs, zero(sample.model_logprob)),
      lengths=s.out.lengths + active.astype(jnp.int32),
      stopped=s.out.stopped | hit_stop,
      steps=s.step + 1)
  done = s.done | hit_stop | (s.step + 1 >= limits.max_new_tokens)
  return s.replace(step=s.step + 1, last_token=token, out=out, done=done)


def row_keys(rng: Array, row_ids: Array) -> Array:
  """[R] PRNG keys, one random stream per row, keyed by its global id (row_ids [R] int32)."""
  # By global id: a row's samples do not depend on which other prompts share the batch (or
  # the process), so multi-process runs match single-process ones.
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids)


def _draw(keys: Array, step: Union[int, Array], logits: Array, rule: TokenRule, mesh: Optional[Mesh]
          ) -> TokenSample:
  """Token `step` ([], or [R]: one per row) of every row, from the row's own stream (`row_keys`)."""
  draw = lambda k, i: jax.random.uniform(jax.random.fold_in(k, i), (), jnp.float32)
  uniforms = jax.vmap(draw, in_axes=(0, None if jnp.ndim(step) == 0 else 0))(keys, step)
  return sample_with_uniform(logits, sharding.constrain(uniforms, mesh), rule)


def _empty_outputs(rows: int, generation_len: int, pad_id: Array, mesh: Optional[Mesh]) -> Decoded:
  buffer = lambda dtype: sharding.constrain(jnp.zeros((rows, generation_len), dtype), mesh)
  return Decoded(
      tokens=buffer(jnp.int32) + pad_id, logprobs=buffer(jnp.float32), scaled_logprobs=buffer(jnp.float32),
      model_logprobs=buffer(jnp.float32), lengths=jnp.zeros((rows,), jnp.int32), stopped=jnp.zeros((rows,), bool),
      steps=jnp.zeros((), jnp.int32))


def initial_decode_state(
    cache: KVCache,  # Prefilled.cache
    first_logits: Array,  # [R, V] Prefilled.logits
    keys: Array,  # [R] row_keys(rng, row_ids)
    limits: Limits,
    *,
    rule: TokenRule,
    generation_len: int,  # N: the generation bucket
    mesh: Optional[Mesh],
) -> DecodeState:
  """The decode loop's first carry: token 0 of every row already sampled (pure, traceable).

  Token 0 comes from the prefill logits (no model call); each of a group's G copies draws its
  own uniform. `jax.eval_shape` of it gives the carry's shapes without running anything.
  """
  rows = first_logits.shape[0]
  s = DecodeState(
      step=jnp.zeros((), jnp.int32),
      last_token=jnp.zeros((rows,), jnp.int32),
      out=_empty_outputs(rows, generation_len, limits.pad_id, mesh),
      done=jnp.zeros((rows,), bool),
      cache=cache)
  return _record(s, _draw(keys, 0, first_logits, rule, mesh), limits, mesh)


def decode_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    s: DecodeState,
    first_positions: Array,  # [R] Prefilled.positions
    keys: Array,  # [R] row_keys(rng, row_ids)
    limits: Limits,
    *,
    rule: TokenRule,
    mesh: Optional[Mesh],
) -> DecodeState:
  """One decode step (the body of `_decode`'s while loop; pure, traceable): feed every row's
  last token through the model, sample token `s.step`, record it.

  Rows already done record pad; the loop stops once every row is done or `max_new_tokens`
  tokens are out (`_keep_going`). Jitted alone (graphdef, rule and mesh static; `s` donated, as
  the loop updates its carry in place) it is one iteration of the loop: `mopd_jax.aot`
  compiles it to size the decode program.
  """
  # RoPE position of the token being fed: the prompt length + its index.
  logits, cache = _next_logits(graphdef, state, s.last_token, first_positions + s.step - 1, s.cache, mesh)
  s = s.replace(cache=cache)
  return _record(s, _draw(keys, s.step, logits, rule, mesh), limits, mesh)


def _next_logits(graphdef: nnx.GraphDef, state: nnx.State, last_token: Array, positions: Array, cache: KVCache,
                 mesh: Optional[Mesh]) -> tuple[Array, KVCache]:
  """Feed each row's last token ([R], at RoPE `positions` [R]): the next token's logits [R, V]
  and the cache with the fed token's keys/values written."""
  model = nnx.merge(graphdef, state)
  ones = jnp.ones((last_token.shape[0], 1), jnp.int32)
  # Under the mesh like `_prefill`'s model call; a one-token step with a cache always takes
  # the XLA attention path, so this changes nothing in the program today.
  with sharding.activation_mesh(mesh):
    out = model(last_token[:, None], positions[:, None], ones, cache)
  cache = sharding.constrain_cache(out.cache, mesh, model.config.num_kv_heads)
  return sharding.constrain(out.logits[:, 0], mesh), cache


def _keep_going(s: DecodeState, limits: Limits) -> Array:
  """The decode loop's condition: a token left in the budget and a row not done."""
  return (s.step < limits.max_new_tokens) & ~jnp.all(s.done)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "rule", "generation_len", "mesh"),
    donate_argnames=("cache",))
def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: KVCache,  # Prefilled.cache, donated: the loop updates it in place
    first_logits: Array,  # [R, V] Prefilled.logits
    first_positions: Array,  # [R] Prefilled.positions
    rng: Array,
    row_ids: Array,  # [R] int32: each row's random stream (prompt id * G + sample index)
    limits: Limits,
    *,
    rule: TokenRule,
    generation_len: int,  # N: the generation bucket
    mesh: Optional[Mesh],
) -> tuple[Decoded, KVCache]:
  """Sample up to `limits.max_new_tokens` tokens per row; returns them and the final cache.

  The cache comes back so that the donated prefill cache is aliased to it (no copy).
  """
  TRACE_COUNTS["decode"] += 1
  keys = row_keys(rng, row_ids)
  s = initial_decode_state(cache, first_logits, keys, limits, rule=rule, generation_len=generation_len, mesh=mesh)
  step = lambda s: decode_step(graphdef, state, s, first_positions, keys, limits, rule=rule, mesh=mesh)
  s = jax.lax.while_loop(lambda s: _keep_going(s, limits), step, s)
  return s.out, s.cache


# ----------------------------------------------------------------------------------------------
# Continuous refill (`SamplingParams.decode_rows`): R slots decode the B*G samples, a freed slot
# taking the next sample. The host alternates `_refill` and `_decode_until_free`.


@flax.struct.dataclass
class RefillState:
  """The refill decoder's carry: R slots over a cache with a write index per slot, and the
  outputs of all B*G samples, each row written by whichever slot decodes that sample."""

  step: Array  # [R] int32, index of the token each slot generates next
  last_token: Array  # [R] int32
  positions: Array  # [R] int32, RoPE position of the slot's first generated token (its prompt length)
  row_ids: Array  # [R] int32, global id of the slot's sample (prompt id * G + sample index): its random stream
  sample: Array  # [R] int32, the output row (local prompt * G + sample index) the slot writes
  done: Array  # [R] bool, the slot's sample ended (or it never had one): free for the next one
  out: Decoded  # [B*G, N] (`steps` unused)
  cache: KVCache  # R rows, index [R]
  decode_calls: Array  # [] int32, model calls so far: decode slot-steps = decode_calls * R


def _record_slots(s: RefillState, sample: TokenSample, active: Array, limits: Limits, mesh: Optional[Mesh]
                  ) -> RefillState:
  """`_record` per slot: token `s.step[r]` of each active slot's sample into its output row;
  inactive slots write nothing and keep their state."""
  target = jnp.where(active, s.sample, s.out.lengths.shape[0])  # out of range: dropped
  put = lambda buf, value: sharding.constrain(buf.at[target, s.step].set(value.astype(buf.dtype), mode="drop"), mesh)
  hit_stop = active & jnp.any(sample.token[:, None] == limits.stop_token_ids[None, :], axis=-1)
  out = s.out.replace(
      tokens=put(s.out.tokens, sample.token), logprobs=put(s.out.logprobs, sample.logprob),
      scaled_logprobs=put(s.out.scaled_logprobs, sample.scaled_logprob),
      model_logprobs=put(s.out.model_logprobs, sample.model_logprob),
      lengths=sharding.constrain(s.out.lengths.at[target].set(s.step + 1, mode="drop"), mesh),
      stopped=sharding.constrain(s.out.stopped.at[target].set(hit_stop, mode="drop"), mesh))
  done = s.done | (active & (hit_stop | (s.step + 1 >= limits.max_new_tokens)))
  return s.replace(step=s.step + active.astype(jnp.int32), last_token=jnp.where(active, sample.token, s.last_token),
                   out=out, done=done)


def _constrain_slots(cache: KVCache, mesh: Optional[Mesh]) -> KVCache:
  cache = sharding.constrain_cache(cache, mesh, cache.keys.shape[2])
  return cache.replace(index=sharding.constrain(cache.index, mesh))


@functools.partial(jax.jit, static_argnames=("config", "rows", "prompt_len", "num_outputs", "generation_len", "mesh"))
def _refill_start(pad_id: Array, *, config: ModelConfig, rows: int, prompt_len: int, num_outputs: int,
                  generation_len: int, mesh: Optional[Mesh]) -> RefillState:
  """R free slots over an empty cache of prompt bucket + generation bucket slots; no output yet."""
  TRACE_COUNTS["refill_start"] += 1
  zeros = lambda dtype: sharding.constrain(jnp.zeros((rows,), dtype), mesh)
  cache = KVCache.empty(config, rows, prompt_len + generation_len, per_row_index=True)
  return RefillState(
      step=zeros(jnp.int32), last_token=zeros(jnp.int32), positions=zeros(jnp.int32), row_ids=zeros(jnp.int32),
      sample=zeros(jnp.int32) + num_outputs, done=~zeros(bool),
      out=_empty_outputs(num_outputs, generation_len, pad_id, mesh), cache=_constrain_slots(cache, mesh),
      decode_calls=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("rule", "mesh"), donate_argnames=("s",))
def _refill(
    s: RefillState,  # donated
    prompts: Prefilled,  # every prompt once (num_samples=1), over prompt-bucket slots only
    src: Array,  # [R] int32, the prompt (row of `prompts`) slot r starts, or -1: slot r keeps going
    sample: Array,  # [R] int32, the output row slot r writes from now on (where src >= 0)
    row_ids: Array,  # [R] int32, that sample's global id (its random stream)
    rng: Array,
    limits: Limits,
    *,
    rule: TokenRule,
    mesh: Optional[Mesh],
) -> RefillState:
  """Start slot r on a new sample where src[r] >= 0: its prompt's prefill cache copied into the
  slot (the same slots as in the one-batch decoder), the rest of the slot's segments cleared
  (stale keys there are masked), and token 0 drawn from the prompt's prefill logits as
  `initial_decode_state` draws it."""
  TRACE_COUNTS["refill"] += 1
  take = src >= 0
  src = jnp.maximum(src, 0)
  slots = jnp.where(take, jnp.arange(take.shape[0]), take.shape[0])  # out of range: dropped
  lp, c = prompts.cache.max_len, s.cache
  copy = lambda stack, new: stack.at[:, slots, :, :lp].set(new[:, src], mode="drop")
  segments = jnp.pad(prompts.cache.segment_ids[src], ((0, 0), (0, c.max_len - lp)))
  cache = KVCache(keys=copy(c.keys, prompts.cache.keys), values=copy(c.values, prompts.cache.values),
                  segment_ids=c.segment_ids.at[slots].set(segments, mode="drop"), index=jnp.where(take, lp, c.index))
  s = s.replace(
      step=jnp.where(take, 0, s.step), positions=jnp.where(take, prompts.positions[src], s.positions),
      row_ids=jnp.where(take, row_ids, s.row_ids), sample=jnp.where(take, sample, s.sample), done=s.done & ~take,
      cache=_constrain_slots(cache, mesh))
  first = _draw(row_keys(rng, s.row_ids), 0, sharding.constrain(prompts.logits[src], mesh), rule, mesh)
  return _record_slots(s, first, take, limits, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "mesh"), donate_argnames=("s",))
def _decode_until_free(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    s: RefillState,  # donated: the loop updates the cache and outputs in place
    rng: Array,
    limits: Limits,
    free_rows: Array,  # [] int32: stop once this many slots are free (> R: once all are)
    *,
    rule: TokenRule,
    mesh: Optional[Mesh],
) -> RefillState:
  """`decode_step` per slot, each at its own token index, until `free_rows` slots are free."""
  TRACE_COUNTS["decode_until_free"] += 1
  keys = row_keys(rng, s.row_ids)

  def step(s: RefillState) -> RefillState:
    logits, cache = _next_logits(graphdef, state, s.last_token, s.positions + s.step - 1, s.cache, mesh)
    s = s.replace(cache=cache, decode_calls=s.decode_calls + 1)
    return _record_slots(s, _draw(keys, s.step, logits, rule, mesh), ~s.done, limits, mesh)

  busy = lambda s: ~jnp.all(s.done) & (jnp.sum(s.done) < free_rows)
  return jax.lax.while_loop(busy, step, s)


# ----------------------------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass(frozen=True, eq=False)
class SampleResult:
  """G rollouts for each of B prompts, as host numpy arrays. Row r belongs to prompt r // G.

  N = `max_new_tokens`. A row's response is `tokens[r, :lengths[r]]` (its stop token, if any,
  included); everything after is `pad_id` with zero log-probs and `response_mask` False.
  """

  tokens: np.ndarray  # [R, N] int32
  logprobs: np.ndarray  # [R, N] float32, under the sampled-from (processed) distribution
  scaled_logprobs: np.ndarray  # [R, N] float32, log_softmax(logits / temperature)
  model_logprobs: np.ndarray  # [R, N] float32, log_softmax(logits)
  lengths: np.ndarray  # [R] int32
  response_mask: np.ndarray  # [R, N] bool
  finish_reasons: tuple[FinishReason, ...]  # [R]
  group_index: np.ndarray  # [R] int32, = r // num_samples
  prompt_tokens: np.ndarray  # [B, Lp] int32, left-padded with pad_id (after truncation)
  prompt_lengths: np.ndarray  # [B] int32
  prompt_truncated: np.ndarray  # [B] int32, tokens dropped from the left of each prompt
  num_samples: int
  decode_steps: int  # tokens generated by the longest row (the one-batch loop exits when all rows end)
  # Rows x decode-loop iterations of this process (model calls over one row each; token 0 of a
  # row comes from the prefill): the decode's cost, which `decode_rows` lowers when lengths vary.
  decode_slot_steps: int
  texts: Optional[tuple[str, ...]] = None  # [R] decoded responses (stop string cut), with decode_fn

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  def response(self, r: int) -> list[int]:
    return self.tokens[r, :self.lengths[r]].tolist()

  def prompt(self, b: int) -> list[int]:
    lp = self.prompt_tokens.shape[1]
    return self.prompt_tokens[b, lp - self.prompt_lengths[b]:].tolist()


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
  return next(b for b in buckets if b >= length)


def _split_model(model: ModelLike) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, state, model.config
  if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    graphdef, state = model
    return graphdef, state, nnx.merge(graphdef, state).config
  raise TypeError(f"sample: model must be a Transformer or a (graphdef, state) pair, got {type(model)}")


def _pack_prompts(prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-pad to the prompt bucket -> (tokens [B, Lp], lengths [B], truncated [B])."""
  if len(prompts) == 0:
    raise ValueError("sample: prompts is empty")
  arrays = []
  for i, p in enumerate(prompts):
    a = np.asarray(p)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"sample: prompt {i} must be a non-empty sequence of token ids, got {p!r:.80}")
    if a.min() < 0 or a.max() >= vocab_size:
      raise ValueError(f"sample: prompt {i} has token ids outside [0, {vocab_size})")
    arrays.append(a)
  longest = max(a.size for a in arrays)
  largest = params.prompt_buckets[-1]
  if longest > largest and not params.truncate_prompts_left:
    raise ValueError(
        f"sample: a prompt has {longest} tokens, more than the largest prompt bucket {largest} "
        "(SamplingParams.prompt_buckets); set SamplingParams.truncate_prompts_left=True to keep "
        "the last tokens instead")
  truncated = np.array([max(a.size - largest, 0) for a in arrays], np.int32)
  arrays = [a[-largest:] for a in arrays]
  lp = _bucket(min(longest, largest), params.prompt_buckets)
  tokens = np.full((len(arrays), lp), params.pad_id, np.int32)
  for i, a in enumerate(arrays):
    tokens[i, lp - a.size:] = a
  return tokens, np.array([a.size for a in arrays], np.int32), truncated


def _cut_at_stop_string(tokens: Sequence[int], stop_strings: tuple[str, ...],
                        decode_fn: Callable[[list[int]], str]) -> tuple[Optional[int], str]:
  """(number of tokens to keep, text) for one response.

  Token-boundary rule: keep tokens[:k] for the smallest k such that decode(tokens[:k])
  contains a stop string (k found by bisection, assuming decoded prefixes only grow), i.e.
  through the token that completed the stop string, even when that token's text extends past
  it: it was sampled, and its log-prob belongs to the rollout. The text is cut right before
  the stop string (the stop string is excluded, as in vLLM/OpenAI). If several stop strings
  complete at token k, the one starting first wins. k is None when no stop string occurs.
  """
  text = decode_fn(list(tokens))
  contains = lambda t: any(s in t for s in stop_strings)
  if not contains(text):
    return None, text
  lo, hi = 0, len(tokens)  # contains(decode(tokens[:hi])) holds, at lo it does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if contains(decode_fn(list(tokens[:mid]))):
      hi = mid
    else:
      lo = mid
  prefix = decode_fn(list(tokens[:hi]))
  start = min(prefix.find(s) for s in stop_strings if s in prefix)
  return hi, prefix[:start]


def _check_mesh(mesh: Mesh, num_prompts: int, state: nnx.State) -> None:
  # A group's G rows are consecutive; with B divisible by the data x fsdp shards, each shard
  # holds whole groups (B/shards prompts, their B*G/shards rows), and repeat_rows is local.
  sharding.check_batch_divisible(num_prompts, mesh, "sample: number of prompts")
  devices = set(mesh.devices.flat)
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) != devices:
      raise ValueError(
          "sample: params are not placed on the mesh; shard them with "
          "mopd_jax.sharding.shard_params(state, mesh)")


def reshard_for_sampling(params: nnx.State, mesh: Mesh, layout: str = "train",
                         rules=sharding.DEFAULT_RULES) -> nnx.State:
  """The params in the sampler's layout (`sharding.sampling_rules`), moved device to device by
  one jitted reshard (never through a host); "train" returns them as they are."""
  if layout == "train":
    return params
  target = sharding.param_shardings(params, mesh, sharding.sampling_rules(layout, rules))
  return _reshard(target)(params)


@functools.lru_cache(maxsize=8)
def _reshard_cached(target_def, target_leaves):
  target = jax.tree.unflatten(target_def, target_leaves)
  return jax.jit(lambda p: p, out_shardings=target)


def _reshard(target):
  leaves, treedef = jax.tree.flatten(target)
  return _reshard_cached(treedef, tuple(leaves))


def _check_local(mesh: Optional[Mesh], state: nnx.State) -> None:
  if mesh is None and not all(
      x.is_fully_addressable for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
    raise ValueError(
        "sample: params span several processes; pass the mesh they live on (mesh=...) so that "
        "every process samples its prompts in one program over it")


def spans_processes(mesh: Optional[Mesh]) -> bool:
  return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def _agree_across_processes(tokens: np.ndarray, pad_id: int) -> np.ndarray:
  """Every process's prompts in one [B_local, Lp] shape: the widest prompt bucket of any
  process (left padding, so a wider bucket only adds padding), and the same prompt count."""
  from jax.experimental import multihost_utils

  shapes = np.asarray(multihost_utils.process_allgather(np.asarray(tokens.shape, np.int64)))
  if len(set(shapes[:, 0].tolist())) > 1:
    raise ValueError(f"sample: every process must pass the same number of prompts, got {shapes[:, 0].tolist()}")
  width = int(shapes[:, 1].max())
  return np.pad(tokens, ((0, 0), (width - tokens.shape[1], 0)), constant_values=pad_id)


def _to_device(x: np.ndarray, mesh: Optional[Mesh]) -> Array:
  """This process's rows onto the mesh: one global array whose rows over data x fsdp are the
  processes' rows in process order (each process passes only its own)."""
  if mesh is None:
    return jnp.asarray(x)
  if spans_processes(mesh):
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim), x)
  return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))


def _replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Values that are the same on every process, as arrays replicated over a mesh that spans
  processes (each process fills its own devices); unchanged otherwise."""
  if not spans_processes(mesh):
    return tree

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding.replicated(mesh), lambda index: host[index])

  return jax.tree.map(leaf, tree)


def _local_rows(decoded: Decoded, mesh: Optional[Mesh]) -> Decoded:
  """This process's rows of the decode output, on the host."""
  if not spans_processes(mesh):
    return jax.device_get(decoded)
  from jax.experimental import multihost_utils

  local = lambda x: np.asarray(x.addressable_data(0)) if x.ndim == 0 else np.asarray(
      multihost_utils.global_array_to_host_local_array(x, mesh, sharding.batch_spec(x.ndim)))
  return jax.tree.map(local, decoded)


def sample(
    model: ModelLike,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    rng: Array,
    sampling_params: SamplingParams = SamplingParams(),
    mesh: Optional[Mesh] = None,
    decode_fn: Optional[Callable[[list[int]], str]] = None,
    prompt_ids: Optional[Sequence[int]] = None,
) -> SampleResult:
  """Sample `num_samples` responses for each prompt (token ids, unpadded, any lengths).

  model: a Transformer or its `nnx.split` (graphdef, state); under `mesh`, the state must
    already be placed with `sharding.shard_params`.
  rng: a jax PRNG key; the same key gives the same result.
  mesh: rows go over data x fsdp; the number of prompts must be divisible by that shard count
    so each prompt's G rows live on one shard (and repeating the cache rows is shard-local);
    so must `SamplingParams.decode_rows` (refill is refused on a mesh that spans processes).
    A mesh may span processes: then every process calls `sample` with its own prompts (the
    same number on each), the prefill and decode run as one SPMD program over the whole mesh
    from the params where they live (e.g. the training layout; see `reshard_for_sampling`),
    and each process gets its own rows back.
  decode_fn: token ids -> text; required for stop strings, and fills `SampleResult.texts`.
  prompt_ids: a global id per prompt (default 0..B-1). Sample g of prompt p draws from the
    random stream (rng, p * num_samples + g), so a prompt's samples are the same whatever else
    is in the batch: the trainer passes global prompt indices, making multi-process sampling
    match a single process.
  """
  params = sampling_params
  if prompt_ids is not None and len(prompt_ids) != len(prompts):
    raise ValueError(f"sample: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
  if not (_is_int(num_samples) and num_samples >= 1):
    raise ValueError(f"sample: num_samples must be an int >= 1, got {num_samples!r}")
  if params.stop_strings and decode_fn is None:
    raise ValueError("sample: SamplingParams.stop_strings needs decode_fn (token ids -> text)")
  graphdef, state, config = _split_model(model)
  _check_local(mesh, state)
  if params.decode_rows is not None:
    _check_refill(params.decode_rows, mesh)
  for name, ids in (("stop_token_ids", params.stop_token_ids), ("pad_id", (params.pad_id,))):
    if any(t >= config.vocab_size for t in ids):
      raise ValueError(f"SamplingParams.{name}={ids} outside the vocabulary of {config.vocab_size}")
  tokens, lengths, truncated = _pack_prompts(prompts, params, config.vocab_size)
  if spans_processes(mesh):
    tokens = _agree_across_processes(tokens, params.pad_id)
  if lengths.max() + params.max_new_tokens > config.max_position_embeddings:
    raise ValueError(
        f"sample: prompt ({lengths.max()}) + max_new_tokens ({params.max_new_tokens}) exceeds "
        f"max_position_embeddings={config.max_position_embeddings} of the model")
  if mesh is not None:
    _check_mesh(mesh, tokens.shape[0] * (jax.process_count() if spans_processes(mesh) else 1), state)
  gen_len = _bucket(params.max_new_tokens, params.generation_buckets)
  ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
  if params.decode_rows is not None and params.decode_rows < len(prompts) * num_samples:
    out, slot_steps = _sample_with_refill(
        graphdef, state, config, tokens, lengths, ids, num_samples=num_samples, rng=rng, params=params,
        generation_len=gen_len, mesh=mesh)
    return _finish(out, slot_steps, params, num_samples, tokens, lengths, truncated, decode_fn)

  prefilled = _prefill(
      graphdef, state, _to_device(tokens, mesh), _to_device(lengths, mesh),
      num_samples=num_samples, generation_len=gen_len, mesh=mesh)
  row_ids = (ids[:, None] * num_samples + np.arange(num_samples)[None, :]).reshape(-1).astype(np.int32)
  decoded, _ = _decode(
      graphdef, state, prefilled.cache, prefilled.logits, prefilled.positions, _replicate(rng, mesh),
      _to_device(row_ids, mesh), _replicate(limits(params), mesh), rule=params.token_rule(), generation_len=gen_len,
      mesh=mesh)
  out = _local_rows(decoded, mesh)
  return _finish(out, out.tokens.shape[0] * (int(out.steps) - 1), params, num_samples, tokens, lengths, truncated,
                 decode_fn)


def _check_refill(decode_rows: int, mesh: Optional[Mesh]) -> None:
  if spans_processes(mesh):
    # The host schedules slots from every slot's `done`; across processes that needs a global
    # view each chunk, which is not built.
    raise ValueError(
        "SamplingParams.decode_rows (continuous refill) is not supported on a mesh that spans processes; "
        "leave it None there")
  if mesh is not None:
    sharding.check_batch_divisible(decode_rows, mesh, "SamplingParams.decode_rows")


def _sample_with_refill(graphdef: nnx.GraphDef, state: nnx.State, config: ModelConfig, tokens: np.ndarray,
                        lengths: np.ndarray, ids: np.ndarray, *, num_samples: int, rng: Array,
                        params: SamplingParams, generation_len: int, mesh: Optional[Mesh]) -> tuple[Decoded, int]:
  """The B*G samples through `decode_rows` slots (module docstring) -> (outputs, decode slot-steps).

  Samples start in order (prompt-major), each in the first free slot; the host sees which slots
  are free after each `_decode_until_free` and refills them.
  """
  rows, g = params.decode_rows, num_samples
  prompts = _prefill(graphdef, state, _to_device(tokens, mesh), _to_device(lengths, mesh), num_samples=1,
                     generation_len=0, mesh=mesh)
  total = tokens.shape[0] * g
  lim, rule = limits(params), params.token_rule()
  s = _refill_start(lim.pad_id, config=config, rows=rows, prompt_len=tokens.shape[1], num_outputs=total,
                    generation_len=generation_len, mesh=mesh)
  started, free = 0, np.ones(rows, bool)
  while True:
    if started < total:
      slots = np.flatnonzero(free)[:total - started]
      new = started + np.arange(len(slots))
      started += len(slots)
      src, sample, row_ids = np.full(rows, -1, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
      src[slots], sample[slots], row_ids[slots] = new // g, new, ids[new // g] * g + new % g
      s = _refill(s, prompts, *(_to_device(x, mesh) for x in (src, sample, row_ids)), rng, lim, rule=rule, mesh=mesh)
    # Once every sample has started, run until all end.
    threshold = params.refill_threshold if started < total else rows + 1
    s = _decode_until_free(graphdef, state, s, rng, lim, np.int32(threshold), rule=rule, mesh=mesh)
    free = np.asarray(s.done)
    if started == total and free.all():
      break
  out = jax.device_get(s.out)
  return out.replace(steps=out.lengths.max()), int(s.decode_calls) * rows


def _finish(out: Decoded, slot_steps: int, params: SamplingParams, num_samples: int, prompt_tokens: np.ndarray,
            prompt_lengths: np.ndarray, truncated: np.ndarray,
            decode_fn: Optional[Callable[[list[int]], str]]) -> SampleResult:
  n = params.max_new_tokens
  tokens = np.array(out.tokens[:, :n])
  logprobs = [np.array(x[:, :n]) for x in (out.logprobs, out.scaled_logprobs, out.model_logprobs)]
  lengths = np.array(out.lengths, np.int32)
  reasons = [FinishReason.STOP if s else FinishReason.LENGTH for s in out.stopped]
  texts = None
  if decode_fn is not None:
    texts = []
    for r in range(tokens.shape[0]):
      cut, text = None, None
      if params.stop_strings:
        cut, text = _cut_at_stop_string(tokens[r, :lengths[r]], params.stop_strings, decode_fn)
      if cut is not None:
        lengths[r], reasons[r] = cut, FinishReason.STOP_STRING
        tokens[r, cut:] = params.pad_id
        for lp in logprobs:
          lp[r, cut:] = 0.0
      texts.append(text if text is not None else decode_fn(tokens[r, :lengths[r]].tolist()))
  rows = tokens.shape[0]
  return SampleResult(
      tokens=tokens, logprobs=logprobs[0], scaled_logprobs=logprobs[1], model_logprobs=logprobs[2],
      lengths=lengths, response_mask=np.arange(n)[None, :] < lengths[:, None],
      finish_reasons=tuple(reasons), group_index=np.arange(rows, dtype=np.int32) // num_samples,
      prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths, prompt_truncated=truncated,
      num_samples=num_samples, decode_steps=int(out.steps), decode_slot_steps=slot_steps,
      texts=None if texts is None else tuple(texts))
