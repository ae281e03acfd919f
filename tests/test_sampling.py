"""Grouped sampler: parity with naive decoding, log-probs, distributions, stopping, sharding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpr_tools import all_equations
from mopd_jax import sampling, sharding
from mopd_jax.models import KVCache, init_model, positions_from_segments, tiny_config
from mopd_jax.sampling import FinishReason, SamplingParams, TokenRule

FAMILIES = ["llama", "qwen2", "qwen3"]
SMALL = dict(prompt_buckets=(8, 16, 32), generation_buckets=(8, 16, 32))
# Prompts of mixed lengths: left padding from 2 to 16 slots in the 32-token bucket.
PROMPTS = [[5, 9, 2], list(range(20, 37)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(40, 70))]


@functools.lru_cache(maxsize=None)
def _model(family: str, seed: int = 0):
  return nnx.split(init_model(tiny_config(family), seed=seed))


def _right_padded(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], segments[i, :len(r)] = r, 1
  return tokens, segments


@functools.lru_cache(maxsize=None)
def _forward_fn(family: str):
  graphdef, state = _model(family)

  @jax.jit
  def forward(tokens, segments):  # full recomputation, no cache
    return nnx.merge(graphdef, state)(tokens, positions_from_segments(segments), segments).logits
  return forward


def _naive_greedy(family: str, prompts: list[list[int]], steps: int) -> np.ndarray:
  """Recompute the full forward pass over prompt + generated tokens at every step."""
  forward = _forward_fn(family)
  rows = [list(p) for p in prompts]
  width = max(map(len, rows)) + steps
  for _ in range(steps):
    tokens, segments = _right_padded(rows, width)
    logits = np.asarray(forward(tokens, segments))
    for i, r in enumerate(rows):
      r.append(int(np.argmax(logits[i, len(r) - 1])))
  return np.array([r[len(p):] for r, p in zip(rows, prompts)])


def _reference_processed(logits: np.ndarray, rule: TokenRule) -> np.ndarray:
  """log-probs of the sampled-from distribution, by sorting (float64)."""
  x = logits.astype(np.float64) / rule.temperature
  logp = x - x.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  keep = np.ones_like(logp, bool)
  order = np.argsort(-logp, axis=-1)
  ranks = np.argsort(order, axis=-1)
  if rule.top_k:
    keep &= ranks < rule.top_k
  if rule.top_p < 1:
    p = np.where(keep, np.exp(logp), 0.0)
    p /= p.sum(-1, keepdims=True)
    sorted_p = np.take_along_axis(p, order, -1)
    mass_before = np.cumsum(sorted_p, -1) - sorted_p
    keep &= np.take_along_axis(mass_before < rule.top_p, ranks, -1)
  logp = np.where(keep, logp, -np.inf)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Decoding against references.


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_naive_full_recompute(family):
  params = SamplingParams(temperature=0, max_new_tokens=32, **SMALL)
  res = sampling.sample(_model(family), PROMPTS, num_samples=2, rng=jax.random.key(0),
                        sampling_params=params)
  expected = _naive_greedy(family, PROMPTS, 32)
  np.testing.assert_array_equal(res.tokens, np.repeat(expected, 2, axis=0))
  assert res.prompt_tokens.shape == (4, 32) and list(res.prompt_lengths) == [3, 17, 11, 30]
  assert all(r == FinishReason.LENGTH for r in res.finish_reasons)
  assert (res.lengths == 32).all() and res.response_mask.all()
  np.testing.assert_array_equal(res.logprobs, 0.0)  # greedy: a point mass
  np.testing.assert_array_equal(res.group_index, [0, 0, 1, 1, 2, 2, 3, 3])


def test_logprobs_equal_teacher_forced_forward():
  family = "qwen3"
  rule = TokenRule(temperature=0.8, top_p=0.9, top_k=40)
  params = SamplingParams(temperature=rule.temperature, top_p=rule.top_p, top_k=rule.top_k,
                          max_new_tokens=24, stop_token_ids=(7,), **SMALL)
  g = 2
  res = sampling.sample(_model(family), PROMPTS, num_samples=g, rng=jax.random.key(1),
                        sampling_params=params)
  rows = [res.prompt(r // g) + res.response(r) for r in range(res.num_rows)]
  tokens, segments = _right_padded(rows, 32 + 24)
  logits = np.asarray(_forward_fn(family)(tokens, segments))
  checked = 0
  for r in range(res.num_rows):
    start = len(res.prompt(r // g))
    for t, tok in enumerate(res.response(r)):
      step_logits = logits[r, start + t - 1]
      np.testing.assert_allclose(res.model_logprobs[r, t], _log_softmax(step_logits)[tok], atol=1e-4)
      np.testing.assert_allclose(
          res.scaled_logprobs[r, t], _log_softmax(step_logits / rule.temperature)[tok], atol=1e-4)
      np.testing.assert_allclose(
          res.logprobs[r, t], _reference_processed(step_logits[None], rule)[0, tok], atol=1e-4)
      checked += 1
  assert checked >= res.num_rows  # every row produced tokens
  # Masked positions carry pad and zero log-probs.
  assert (res.tokens[~res.response_mask] == params.pad_id).all()
  for lp in (res.logprobs, res.scaled_logprobs, res.model_logprobs):
    assert (lp[~res.response_mask] == 0).all()
  # The G samples of a prompt are independent draws, not copies.
  assert any(res.response(r) != res.response(r + 1) for r in range(0, res.num_rows, g))


def _dot_operand_shapes(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
  """Both operands' shapes of every matmul (einsum may put the kernel first)."""
  return [tuple(tuple(v.aval.shape) for v in e.invars) for e in all_equations(jaxpr) if e.primitive.name == "dot_general"]


def test_prefill_runs_once_per_prompt_and_groups_start_from_identical_caches():
  graphdef, state = _model("llama")
  b, g, lp = 2, 4, 16
  tokens = np.zeros((b, lp), np.int32)
  tokens[0, -5:], tokens[1, -9:] = np.arange(1, 6), np.arange(10, 19)
  lengths = np.array([5, 9], np.int32)
  prefill = functools.partial(sampling._prefill, num_samples=g, generation_len=8, mesh=None)
  dots = _dot_operand_shapes(jax.make_jaxpr(prefill, static_argnums=0)(graphdef, state, tokens, lengths).jaxpr)
  # Every projection runs on the B x Lp prompt tokens; nothing on B*G rows.
  assert dots and all(any(s[0] == b for s in operands) for operands in dots), dots
  assert not any(s[0] == b * g for operands in dots for s in operands), dots
  assert any((b, lp, 64) in operands for operands in dots)
  out = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths))
  single = sampling._prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                             num_samples=1, generation_len=8, mesh=None)
  assert out.cache.keys.shape[1] == b * g and int(out.cache.index) == lp  # [L, B*G, KVH, S, D]
  # The decode loop takes the prefill cache as a donated buffer and aliases it to its output.
  hlo = sampling._decode.lower(
      graphdef, state, out.cache, out.logits, out.positions, jax.random.key(0),
      jnp.arange(b * g, dtype=jnp.int32), sampling.limits(SamplingParams(max_new_tokens=8)), rule=TokenRule(1.0, 1.0, 0),
      generation_len=8, mesh=None).compile().as_text()
  assert "input_output_alias" in hlo.split("\n", 1)[0]
  for got, ref in zip((out.cache.keys, out.cache.values), (single.cache.keys, single.cache.values)):
    np.testing.assert_array_equal(np.asarray(got), np.repeat(np.asarray(ref), g, axis=1))  # [L, rows, ...]
  for got, ref in zip(jax.tree.leaves((out.cache.segment_ids, out.logits, out.positions)),
                      jax.tree.leaves((single.cache.segment_ids, single.logits, single.positions))):
    np.testing.assert_array_equal(np.asarray(got), np.repeat(np.asarray(ref), g, axis=0))


@pytest.mark.parametrize("rule", [TokenRule(0.0, 1.0, 0), TokenRule(0.8, 0.9, 5)], ids=["greedy", "sampled"])
def test_decode_step_by_hand_equals_the_decode_loop(rule):
  """`_decode` = `initial_decode_state`, then `decode_step` while `_keep_going`: the steps jitted
  one at a time, from the same keys, give the loop's tokens, log-probs and final cache."""
  graphdef, state = _model("llama")
  b, g, lp, n = 2, 2, 16, 8
  tokens = np.zeros((b, lp), np.int32)
  tokens[0, -5:], tokens[1, -9:] = np.arange(1, 6), np.arange(10, 19)
  prefill = lambda: sampling._prefill(graphdef, state, jnp.asarray(tokens), jnp.array([5, 9], np.int32),
                                      num_samples=g, generation_len=n, mesh=None)
  rng, row_ids = jax.random.key(3), jnp.arange(b * g, dtype=jnp.int32)
  decode = lambda pre, limits: sampling._decode(  # donates pre.cache
      graphdef, state, pre.cache, pre.logits, pre.positions, rng, row_ids, limits, rule=rule,
      generation_len=n, mesh=None)
  # A stop token row 0 emits at step 2: row 0 ends early, the others run to max_new_tokens=6
  # (below the bucket n), unless they emit it too.
  free, _ = decode(prefill(), sampling.limits(SamplingParams(max_new_tokens=n)))
  limits = sampling.limits(SamplingParams(max_new_tokens=6, stop_token_ids=(int(free.tokens[0, 2]),)))

  pre = prefill()
  keys = sampling.row_keys(rng, row_ids)
  s = jax.jit(sampling.initial_decode_state, static_argnames=("rule", "generation_len", "mesh"))(
      pre.cache, pre.logits, keys, limits, rule=rule, generation_len=n, mesh=None)
  step = jax.jit(sampling.decode_step, static_argnames=("graphdef", "rule", "mesh"))
  steps = 0
  while sampling._keep_going(s, limits):
    s = step(graphdef, state, s, pre.positions, keys, limits, rule=rule, mesh=None)
    steps += 1
  expected, cache = decode(pre, limits)
  assert int(expected.steps) == steps + 1 and int(s.step) == steps + 1
  assert bool(expected.stopped[0]) and int(expected.lengths[0]) <= 3
  for name in ("tokens", "lengths", "stopped", "steps"):
    np.testing.assert_array_equal(getattr(s.out, name), getattr(expected, name), err_msg=name)
  # Same computation; only XLA's fusion of a standalone step vs. the loop body may differ.
  for name in ("logprobs", "scaled_logprobs", "model_logprobs"):
    np.testing.assert_allclose(getattr(s.out, name), getattr(expected, name), rtol=0, atol=1e-6, err_msg=name)
  for got, want in zip(jax.tree.leaves(s.cache), jax.tree.leaves(cache)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The sampling step against its target distribution.

N_DRAWS = 40_000


def _draw(logits: np.ndarray, rule: TokenRule, seed: int = 0):
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_DRAWS, logits.shape[-1]))
  out = jax.jit(sampling.sample_token, static_argnums=2)(batch, jax.random.key(seed), rule)
  return np.asarray(out.token), np.asarray(out.logprob)


@pytest.mark.parametrize("rule", [
    TokenRule(1.0, 1.0, 0), TokenRule(0.5, 1.0, 0), TokenRule(2.0, 1.0, 0),
    TokenRule(1.0, 1.0, 3), TokenRule(1.0, 0.7, 0), TokenRule(0.8, 0.6, 5),
], ids=lambda r: f"T{r.temperature}-p{r.top_p}-k{r.top_k}")
def test_sample_token_matches_target_distribution(rule):
  """Bound: |freq - p| < 4 sd = 4 sqrt(p (1 - p) / n) per token (fixed seed, n = 40k);
  tokens outside the top-k / nucleus are never drawn; returned log-probs are the target's."""
  probs = np.array([0.3, 0.22, 0.17, 0.12, 0.09, 0.06, 0.04])
  logits = np.log(probs) + 1.5  # an offset: only differences matter
  target = np.exp(_reference_processed(logits[None], rule)[0])
  tokens, logprob = _draw(logits, rule)
  freq = np.bincount(tokens, minlength=len(probs)) / N_DRAWS
  bound = 4 * np.sqrt(target * (1 - target) / N_DRAWS)
  assert (np.abs(freq - target) <= bound).all(), (freq, target)
  assert (freq[target == 0] == 0).all()
  np.testing.assert_allclose(logprob, np.log(target[tokens]), atol=1e-5)


def test_sample_token_large_vocab_chi_square():
  """V = 1000 exercises the blocked inverse CDF (padded to 4 blocks of 256): chi-square
  goodness of fit at p > 1e-3 with a fixed seed; padding ids are never drawn."""
  from scipy import stats
  logits = np.random.RandomState(0).normal(size=1000) * 1.5
  tokens, _ = _draw(logits, TokenRule(1.0, 1.0, 0), seed=3)
  assert tokens.max() < 1000
  target = np.exp(_log_softmax(logits))
  heavy = target * N_DRAWS >= 5  # pool the light tail into one category
  observed = np.bincount(tokens, minlength=1000)
  obs = np.append(observed[heavy], observed[~heavy].sum())
  exp = np.append(target[heavy], target[~heavy].sum()) * N_DRAWS
  assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_nucleus_mask_equals_sort_based_cut():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(16, 3000)) * rng.uniform(0.5, 4, size=(16, 1))
  for top_p in (0.05, 0.5, 0.9, 0.999):
    w = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)
    got = np.asarray(sampling._nucleus_mask(jnp.asarray(w), top_p))
    want = np.isfinite(_reference_processed(logits, TokenRule(1.0, top_p, 0)))
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's compiled program")
@pytest.mark.parametrize("rule", [TokenRule(1.0, 1.0, 0), TokenRule(1.0, 0.9, 0), TokenRule(0.7, 0.9, 50)])
def test_sampling_step_never_sorts_the_vocabulary(rule):
  """A full [B, V] sort costs ~100x the rest of the step on CPU; top-k must use XLA's TopK."""
  logits = jnp.zeros((4, 4096), jnp.float32)
  hlo = jax.jit(sampling.sample_token, static_argnums=2).lower(
      logits, jax.random.key(0), rule).compile().as_text()
  assert not [line for line in hlo.splitlines() if " sort(" in line and "4096" in line]


def test_greedy_sample_token_is_argmax():
  logits = np.random.RandomState(2).normal(size=(5, 50)).astype(np.float32)
  out = sampling.sample_token(jnp.asarray(logits), jax.random.key(0), SamplingParams(temperature=0))
  np.testing.assert_array_equal(out.token, logits.argmax(-1))
  np.testing.assert_allclose(out.model_logprob, _log_softmax(logits).max(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Determinism, compilation cache, stopping.


def test_rng_determinism_and_no_recompilation():
  model = _model("llama")
  params = SamplingParams(max_new_tokens=20, stop_token_ids=(0,), **SMALL)
  prompt_sets = [PROMPTS, [p[::-1] for p in PROMPTS], [[1] * 20, [2] * 3, [3] * 17, [4] * 25],
                 [[2] * 32] * 4, PROMPTS]
  results = []
  for i, prompts in enumerate(prompt_sets):  # same buckets: (4 prompts, 32) x (32 new)
    # max_new_tokens (within its bucket), prompts, rng and stop strings vary freely.
    p = params.replace(max_new_tokens=20 + 3 * i, stop_strings=("zz",) if i == 4 else ())
    results.append(sampling.sample(model, prompts, num_samples=2, rng=jax.random.key(i % 2),
                                   sampling_params=p, decode_fn=lambda ids: ""))
    if i == 0:
      traces = dict(sampling.TRACE_COUNTS)
      sizes = (sampling._prefill._cache_size(), sampling._decode._cache_size())
  assert dict(sampling.TRACE_COUNTS) == traces
  assert (sampling._prefill._cache_size(), sampling._decode._cache_size()) == sizes
  # Same rng (and inputs) -> identical; another rng -> different samples.
  again = sampling.sample(model, PROMPTS, num_samples=2, rng=jax.random.key(0),
                          sampling_params=params)
  np.testing.assert_array_equal(again.tokens, results[0].tokens)
  np.testing.assert_array_equal(again.logprobs, results[0].logprobs)
  other = sampling.sample(model, PROMPTS, num_samples=2, rng=jax.random.key(7),
                          sampling_params=params)
  assert (other.tokens != again.tokens).mean() > 0.5


def _digits(ids) -> str:
  return "".join(f"{int(t):03d}" for t in ids)


def test_stop_tokens_and_stop_strings():
  family, n = "qwen2", 24
  model = _model(family)
  free = _naive_greedy(family, PROMPTS, n)  # what greedy decoding emits without stopping
  stop_token = int(free[1, 4])
  stop_string = _digits(free[0])[3 * 6 + 1:3 * 7 + 1]  # spans the boundary of tokens 6 and 7
  params = SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=(stop_token, 127),
                          stop_strings=(stop_string, "no such string"), pad_id=1, **SMALL)
  res = sampling.sample(model, PROMPTS, num_samples=2, rng=jax.random.key(0),
                        sampling_params=params, decode_fn=_digits)
  for r in range(res.num_rows):
    row = list(free[r // 2])
    length, reason = n, FinishReason.LENGTH
    hits = [i for i, t in enumerate(row) if t in params.stop_token_ids]
    if hits:
      length, reason = hits[0] + 1, FinishReason.STOP
    text = _digits(row[:length])
    start = text.find(stop_string)
    if start >= 0:  # completes inside token ceil((start + len) / 3) - 1: keep through it
      length, reason = -(-(start + len(stop_string)) // 3), FinishReason.STOP_STRING
      text = text[:start]
    assert res.finish_reasons[r] == reason, r
    assert res.lengths[r] == length, r
    assert res.texts[r] == text
    np.testing.assert_array_equal(res.tokens[r, :length], row[:length])
    assert (res.tokens[r, length:] == params.pad_id).all()
    assert res.response_mask[r].sum() == length and res.response_mask[r, :length].all()
    assert (res.model_logprobs[r, length:] == 0).all() and (res.model_logprobs[r, :length] < 0).all()
  assert res.finish_reasons[0] == FinishReason.STOP_STRING and res.lengths[0] <= 8
  assert res.finish_reasons[2] in (FinishReason.STOP, FinishReason.STOP_STRING) and res.lengths[2] <= 5


def test_early_exit_when_all_rows_stop():
  """When every row's first token is a stop token the loop ends after that token."""
  first = [int(t) for t in _naive_greedy("llama", PROMPTS, 1)[:, 0]]
  params = SamplingParams(temperature=0, max_new_tokens=32, stop_token_ids=tuple(first), pad_id=3,
                          **SMALL)
  res = sampling.sample(_model("llama"), PROMPTS, num_samples=2, rng=jax.random.key(0),
                        sampling_params=params)
  assert res.decode_steps == 1
  assert (res.lengths == 1).all() and all(r == FinishReason.STOP for r in res.finish_reasons)
  np.testing.assert_array_equal(res.tokens[:, 0], np.repeat(first, 2))
  assert (res.tokens[:, 1:] == 3).all() and res.tokens.shape == (8, 32)
  free = sampling.sample(_model("llama"), PROMPTS, num_samples=2, rng=jax.random.key(0),
                         sampling_params=params.replace(stop_token_ids=()))
  assert free.decode_steps == 32


# ---------------------------------------------------------------------------------------------
# Continuous refill (SamplingParams.decode_rows).

# 12 prompts of 2..30 tokens; 8 of the 128 ids stop a row, so at temperature 1 rows end
# after ~16 tokens on average, many far earlier, some at max_new_tokens.
REFILL_PROMPTS = [list(np.random.RandomState(i).randint(1, 128, size=n)) for i, n in
                  enumerate([3, 17, 11, 30, 2, 25, 8, 14, 5, 21, 9, 28])]
REFILL_PARAMS = SamplingParams(temperature=1.0, max_new_tokens=24, stop_token_ids=(3, 17, 29, 55, 70, 88, 101, 120),
                               **SMALL)


def _assert_same_rollouts(got: sampling.SampleResult, want: sampling.SampleResult, atol: float = 1e-6):
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_array_equal(got.response_mask, want.response_mask)
  assert got.finish_reasons == want.finish_reasons and got.decode_steps == want.decode_steps
  # Bit-identical where the decode batches pick the same matmul kernels; XLA:CPU picks by row
  # count, which moves a log-prob by an ulp or two (the one-batch sampler does the same with
  # fewer prompts).
  for name in ("logprobs", "scaled_logprobs", "model_logprobs"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("family, rule, rows, free_rows", [
    ("llama", TokenRule(1.0, 1.0, 0), 5, 1), ("qwen3", TokenRule(0.8, 0.9, 20), 8, 3),
    ("qwen2", TokenRule(1.0, 1.0, 0), 16, None)], ids=["llama-5rows", "qwen3-topk-topp-8rows", "qwen2-16rows"])
def test_refill_gives_the_one_batch_rollouts_in_fewer_slot_steps(family, rule, rows, free_rows):
  """Same rng, prompts and samples with and without refill: the same rollouts, whatever slot
  decodes each sample and whenever it starts (more samples than slots, rows not a multiple of
  G, ends spread by stop tokens); the decode costs fewer slot-steps."""
  params = REFILL_PARAMS.replace(temperature=rule.temperature, top_p=rule.top_p, top_k=rule.top_k)
  refill = params.replace(decode_rows=rows, refill_free_rows=free_rows)
  call = lambda p, **kw: sampling.sample(_model(family), REFILL_PROMPTS, num_samples=2, rng=jax.random.key(4),
                                         sampling_params=p, **kw)
  want, got = call(params), call(refill)
  _assert_same_rollouts(got, want)
  assert len(set(want.lengths.tolist())) > 5 and (want.lengths < 8).sum() >= 4, want.lengths
  # Fewer model calls over rows than the one batch of 24 rows (which fails if refill is skipped);
  # every call decodes `rows` rows.
  assert got.decode_slot_steps < want.decode_slot_steps and got.decode_slot_steps % rows == 0
  assert want.decode_slot_steps == 24 * (want.decode_steps - 1)
  # Another rng, prompt ids and max_new_tokens reuse the compiled programs.
  traces = dict(sampling.TRACE_COUNTS)
  other = call(refill.replace(max_new_tokens=20), prompt_ids=range(100, 112))
  assert dict(sampling.TRACE_COUNTS) == traces
  _assert_same_rollouts(other, call(params.replace(max_new_tokens=20), prompt_ids=range(100, 112)))


def test_refill_programs_update_the_cache_in_place():
  graphdef, state = _model("llama")
  config = tiny_config("llama")
  rows, lp, n = 4, 16, 8
  tokens = np.zeros((3, lp), np.int32)
  tokens[:, -4:] = np.arange(1, 13).reshape(3, 4)
  prompts = sampling._prefill(graphdef, state, jnp.asarray(tokens), jnp.full((3,), 4, np.int32), num_samples=1,
                              generation_len=0, mesh=None)
  s = sampling._refill_start(np.int32(0), config=config, rows=rows, prompt_len=lp, num_outputs=6,
                             generation_len=n, mesh=None)
  limits, rule = sampling.limits(SamplingParams(max_new_tokens=n)), TokenRule(1.0, 1.0, 0)
  ids = jnp.zeros(rows, jnp.int32)
  for program in (
      sampling._refill.lower(s, prompts, ids, ids, ids, jax.random.key(0), limits, rule=rule, mesh=None),
      sampling._decode_until_free.lower(graphdef, state, s, jax.random.key(0), limits, np.int32(1), rule=rule,
                                        mesh=None)):
    hlo = program.compile().as_text()
    assert "input_output_alias" in hlo.split("\n", 1)[0]
    # No copy of the whole [L, R, KVH, S, D] stacked cache (a vmapped per-row write made one in
    # every layer of every step, as reading a layer before writing it did; LayerCache).
    cache_shape = "f32[{},{},{},{},{}]".format(*s.cache.keys.shape)
    assert not [line for line in hlo.splitlines() if " copy(" in line and cache_shape in line]


@pytest.mark.parametrize("t", [1, 3])
def test_a_per_row_cache_index_equal_in_every_row_is_the_scalar_index(t):
  """KVCache.index [B] (continuous refill) against the scalar index everyone else uses."""
  graphdef, state = _model("qwen3")
  model = nnx.merge(graphdef, state)
  b, lp = 3, 8
  tokens = np.arange(1, 1 + b * lp).reshape(b, lp) % 100
  segments = np.ones((b, lp), np.int32)
  cache = model(jnp.asarray(tokens), positions_from_segments(segments), segments,
                KVCache.empty(model.config, b, lp + 8), fresh_cache=True).cache
  step = jnp.asarray(np.arange(50, 50 + b * t).reshape(b, t))
  positions = jnp.asarray(lp + np.tile(np.arange(t), (b, 1)))
  ones = jnp.ones((b, t), jnp.int32)
  scalar = model(step, positions, ones, cache)
  per_row = model(step, positions, ones, cache.replace(index=jnp.full((b,), cache.index)))
  np.testing.assert_array_equal(per_row.logits, scalar.logits)
  assert per_row.cache.index.shape == (b,) and (per_row.cache.index == scalar.cache.index).all()
  for name in ("keys", "values", "segment_ids"):
    np.testing.assert_array_equal(getattr(per_row.cache, name), getattr(scalar.cache, name), err_msg=name)
  # Rows at different slots: row 1 one slot later sees one more (empty) slot, same logits.
  shifted = cache.replace(index=jnp.array([lp, lp + 1, lp]))
  moved = model(step, positions, ones, shifted)
  np.testing.assert_allclose(moved.logits, scalar.logits, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(moved.cache.segment_ids[1, lp + 1:lp + 1 + t], 1)
  assert (moved.cache.segment_ids[1, lp] == 0) and list(moved.cache.index) == [lp + t, lp + 1 + t, lp + t]


# ---------------------------------------------------------------------------------------------
# Sharding.


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_greedy_equals_single_device(mesh_shape):
  graphdef, state = _model("qwen3")
  prompts = [list(range(i + 1, 2 * i + 5)) for i in range(8)]
  params = SamplingParams(temperature=0, max_new_tokens=16, **SMALL)
  expected = sampling.sample((graphdef, state), prompts, num_samples=2, rng=jax.random.key(0),
                             sampling_params=params)
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  sharded = sharding.shard_params(state, mesh)
  got = sampling.sample((graphdef, sharded), prompts, num_samples=2, rng=jax.random.key(0),
                        sampling_params=params, mesh=mesh)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_allclose(got.model_logprobs, expected.model_logprobs, atol=1e-5)
  with pytest.raises(ValueError, match="not divisible by the data x fsdp"):
    sampling.sample((graphdef, sharded), prompts[:6], num_samples=2, rng=jax.random.key(0),
                    sampling_params=params, mesh=mesh)
  with pytest.raises(ValueError, match="shard_params"):
    sampling.sample((graphdef, state), prompts, num_samples=2, rng=jax.random.key(0),
                    sampling_params=params, mesh=mesh)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_refill_equals_the_one_batch_sampler(mesh_shape):
  graphdef, state = _model("qwen3")
  prompts = REFILL_PROMPTS[:8]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  sharded = sharding.shard_params(state, mesh)
  call = lambda model, p, **kw: sampling.sample(model, prompts, num_samples=3, rng=jax.random.key(2),
                                                sampling_params=p, **kw)
  want = call((graphdef, sharded), REFILL_PARAMS, mesh=mesh)
  got = call((graphdef, sharded), REFILL_PARAMS.replace(decode_rows=8, refill_free_rows=2), mesh=mesh)
  _assert_same_rollouts(got, want)
  assert got.decode_slot_steps < want.decode_slot_steps
  with pytest.raises(ValueError, match="SamplingParams.decode_rows: 6 rows are not divisible by the data x fsdp"):
    call((graphdef, sharded), REFILL_PARAMS.replace(decode_rows=6), mesh=mesh)


def test_refill_is_refused_on_a_mesh_that_spans_processes(monkeypatch):
  graphdef, state = _model("llama")
  mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
  monkeypatch.setattr(sampling, "spans_processes", lambda mesh: True)
  with pytest.raises(ValueError, match="SamplingParams.decode_rows .* not supported on a mesh that spans processes"):
    sampling.sample((graphdef, sharding.shard_params(state, mesh)), REFILL_PROMPTS[:8], num_samples=2,
                    rng=jax.random.key(0), sampling_params=REFILL_PARAMS.replace(decode_rows=8), mesh=mesh)


# ---------------------------------------------------------------------------------------------
# Errors and truncation.


@pytest.mark.parametrize("changes, field", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=100, generation_buckets=(32, 64)), "max_new_tokens"),
    (dict(prompt_buckets=(64, 32)), "prompt_buckets"), (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_strings=("",)), "stop_strings"), (dict(decode_rows=0), "decode_rows"),
    (dict(decode_rows=4.0), "decode_rows"), (dict(decode_rows=8, refill_free_rows=0), "refill_free_rows"),
    (dict(refill_free_rows=2), "refill_free_rows"), (dict(decode_rows=4, refill_free_rows=5), "refill_free_rows"),
])
def test_bad_sampling_params_name_the_field(changes, field):
  with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
    SamplingParams(**changes)


def test_bad_sample_inputs_fail_clearly():
  model = _model("llama")
  params = SamplingParams(max_new_tokens=8, **SMALL)
  call = lambda prompts, **kw: sampling.sample(
      model, prompts, **{"num_samples": 2, "rng": jax.random.key(0), "sampling_params": params, **kw})
  with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
    call(PROMPTS, num_samples=0)
  with pytest.raises(ValueError, match="40 tokens, more than the largest prompt bucket 32"):
    call([list(range(40))])
  with pytest.raises(ValueError, match="non-empty"):
    call([[]])
  with pytest.raises(ValueError, match="outside"):
    call([[1, 500]])
  with pytest.raises(ValueError, match="needs decode_fn"):
    call(PROMPTS, sampling_params=params.replace(stop_strings=("x",)))
  with pytest.raises(ValueError, match="stop_token_ids"):
    call(PROMPTS, sampling_params=params.replace(stop_token_ids=(128,)))


def test_left_truncation_is_reported():
  params = SamplingParams(temperature=0, max_new_tokens=32, truncate_prompts_left=True, **SMALL)
  long = list(range(1, 41))
  prompts = [long, [7, 8]] + PROMPTS[2:]
  res = sampling.sample(_model("llama"), prompts, num_samples=2, rng=jax.random.key(0),
                        sampling_params=params)
  np.testing.assert_array_equal(res.prompt_truncated, [8, 0, 0, 0])
  assert res.prompt(0) == long[8:] and res.prompt(1) == [7, 8]
  short = sampling.sample(_model("llama"), [long[8:]] + prompts[1:], num_samples=2,
                          rng=jax.random.key(0), sampling_params=params)
  np.testing.assert_array_equal(res.tokens, short.tokens)


def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_batch():
  """Keyed by global prompt id: what multi-process sampling relies on."""
  cfg = tiny_config("llama")
  model = init_model(cfg, seed=7)
  params = SamplingParams(temperature=1.0, max_new_tokens=8, prompt_buckets=(16,), generation_buckets=(8,))
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3]]
  key = jax.random.key(11)
  whole = sampling.sample(model, prompts, num_samples=2, rng=key, sampling_params=params, prompt_ids=[0, 1, 2, 3])
  halves = [sampling.sample(model, prompts[i:i + 2], num_samples=2, rng=key, sampling_params=params,
                            prompt_ids=[i, i + 1]) for i in (0, 2)]
  np.testing.assert_array_equal(whole.tokens, np.concatenate([h.tokens for h in halves]))
  other = sampling.sample(model, prompts[:2], num_samples=2, rng=key, sampling_params=params, prompt_ids=[2, 3])
  assert not np.array_equal(other.tokens, halves[0].tokens)


def test_reshard_for_sampling_gathers_fsdp_on_device_and_keeps_tensor_parallelism():
  from mopd_jax import sharding
  graphdef, state = _model("llama")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  params = sharding.shard_params(state, mesh)
  assert sampling.reshard_for_sampling(params, mesh, "train") is params  # no copy
  moved = sampling.reshard_for_sampling(params, mesh, "no_fsdp")
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(params))  # the training layout uses fsdp
  for src, dst in zip(jax.tree.leaves(params), jax.tree.leaves(moved)):
    assert "fsdp" not in str(dst.sharding.spec) and dst.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(dst), np.asarray(src))
  kernel = moved["layers"]["mlp"]["gate_up_proj"]["kernel"].value  # [layers, embed, 2, mlp]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  assert kernel.addressable_shards[0].data.shape[3] == kernel.shape[3] // 2
  # Sampling from either layout gives the same rows.
  prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
  params_greedy = SamplingParams(temperature=0.0, max_new_tokens=6, **SMALL)
  a = sampling.sample((graphdef, params), prompts, num_samples=2, rng=jax.random.key(0),
                      sampling_params=params_greedy, mesh=mesh)
  b = sampling.sample((graphdef, moved), prompts, num_samples=2, rng=jax.random.key(0),
                      sampling_params=params_greedy, mesh=mesh)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  with pytest.raises(ValueError, match="sampling layout must be one of"):
    sharding.sampling_rules("everywhere")
