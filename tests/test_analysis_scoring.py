"""Teacher scoring with context reuse: equal to full-context scoring and to a plain forward."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mopd_jax import sharding
from mopd_jax.analysis import scoring
from mopd_jax.models import init_model, positions_from_segments, tiny_config

# Small buckets and batches, so one call crosses several buckets, context batches and
# response batches (and pads rows).
PARAMS = scoring.ScoringParams(
    context_buckets=(16, 32), response_buckets=(8, 32), context_batch=2, response_batch=4, chunk_size=8)


def _rng_tokens(rng: np.random.Generator, n: int) -> list[int]:
  return rng.integers(1, 128, size=n).tolist()


@functools.lru_cache(maxsize=None)
def _model(family: str = "llama"):
  return nnx.split(init_model(tiny_config(family), seed=3))


def _pairs() -> list[tuple[list[int], list[int]]]:
  """4 contexts of lengths 3..29 with 0 to 4 responses of lengths 1..25 each (and an empty one)."""
  rng = np.random.default_rng(0)
  contexts = [_rng_tokens(rng, n) for n in (3, 17, 29, 9)]
  responses_per_context = {0: (1, 5, 25), 1: (12,), 2: (2, 7, 16, 9), 3: ()}
  pairs = []
  for c, lengths in responses_per_context.items():
    pairs += [(contexts[c], _rng_tokens(rng, n)) for n in lengths]
  pairs.append((contexts[1], []))  # an empty response scores 0
  pairs.append(pairs[0])  # a repeated pair
  return pairs


def _plain_forward_logprobs(model, context: list[int], response: list[int], temperature: float) -> np.ndarray:
  """Ground truth: one unpadded sequence, full logits, log_softmax."""
  graphdef, state = model
  seq = np.array([context + response], np.int32)
  segments = np.ones_like(seq)
  logits = nnx.merge(graphdef, state)(seq, positions_from_segments(segments), segments).logits[0]
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  t = np.arange(len(response))
  return np.asarray(logp[len(context) - 1 + t, np.array(response, int)])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reuse_matches_full_context_scoring(temperature):
  model = _model()
  pairs = _pairs()
  params = scoring.ScoringParams(**{**PARAMS.__dict__, "temperature": temperature})
  reuse = scoring.score_pairs(model, pairs, params=params)
  full = scoring.score_full(model, pairs, params=params)
  assert reuse.num_contexts == 3  # the context without responses is never encoded
  assert full.num_contexts == len(pairs)
  assert reuse.num_pairs == len(pairs) - 1  # the repeated pair is scored once
  np.testing.assert_array_equal(reuse.response_lengths, [len(r) for _, r in pairs])
  np.testing.assert_array_equal(reuse.context_lengths, [len(c) for c, _ in pairs])
  np.testing.assert_allclose(reuse.sum_logprob, full.sum_logprob, atol=1e-4, rtol=0)
  np.testing.assert_allclose(reuse.mean_logprob, full.mean_logprob, atol=1e-4, rtol=0)
  for j, (context, response) in enumerate(pairs):
    np.testing.assert_allclose(reuse.token_logprobs[j], full.token_logprobs[j], atol=1e-4, rtol=0)
    if j in (0, 2, 6):  # context lengths 3 and 29, response lengths 1 to 25
      truth = _plain_forward_logprobs(model, context, response, temperature)
      np.testing.assert_allclose(reuse.token_logprobs[j], truth, atol=1e-4, rtol=0)
  empty = next(j for j, (_, r) in enumerate(pairs) if not r)
  assert reuse.sum_logprob[empty] == 0 and reuse.mean_logprob[empty] == 0
  assert np.all(reuse.sum_logprob[reuse.response_lengths > 0] < 0)


def test_score_with_reuse_keeps_given_order_and_reports_progress():
  model = _model()
  rng = np.random.default_rng(1)
  contexts = [_rng_tokens(rng, n) for n in (20, 4)]
  responses = [_rng_tokens(rng, n) for n in (3, 8, 1, 6, 11)]
  context_of = [1, 0, 1, 1, 0]
  seen = []
  result = scoring.score_with_reuse(model, contexts, responses, context_of, params=PARAMS,
                                    progress=lambda done, total: seen.append((done, total)))
  full = scoring.score_full(model, [(contexts[c], r) for c, r in zip(context_of, responses)], params=PARAMS)
  np.testing.assert_allclose(result.sum_logprob, full.sum_logprob, atol=1e-4, rtol=0)
  assert seen[-1] == (5, 5) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))


def test_reuse_on_a_mesh_matches_unsharded():
  model = _model("qwen3")  # qk-norm; GQA 4 heads / 2 kv heads: kv heads split over tensor=2
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2), devices=jax.devices()[:4])
  graphdef, state = model
  sharded = (graphdef, sharding.shard_params(state, mesh))
  pairs = _pairs()
  on_mesh = scoring.score_pairs(sharded, pairs, params=PARAMS, mesh=mesh)
  plain = scoring.score_pairs(model, pairs, params=PARAMS)
  np.testing.assert_allclose(on_mesh.sum_logprob, plain.sum_logprob, atol=1e-4, rtol=0)


def test_too_long_inputs_fail_with_the_field_name():
  model = _model()
  with pytest.raises(ValueError, match="context_buckets"):
    scoring.score_pairs(model, [(list(range(1, 40)), [1, 2])], params=PARAMS)
  with pytest.raises(ValueError, match="response_buckets"):
    scoring.score_pairs(model, [([1, 2], list(range(1, 40)))], params=PARAMS)
  with pytest.raises(ValueError, match="empty"):
    scoring.score_pairs(model, [([], [1])], params=PARAMS)
  with pytest.raises(ValueError, match="outside"):
    scoring.score_pairs(model, [([1], [500])], params=PARAMS)
