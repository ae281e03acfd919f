"""The greedy KV-cached decoder behind `python -m mopd_jax.chat`, against full recomputation."""

import jax
import jax.numpy as jnp
from flax import nnx

from mopd_jax.chat import greedy_generate
from mopd_jax.models import init_model, positions_from_segments, tiny_config


def _naive(model, prompt, steps):
  """Full recomputation each step over one fixed-width, right-padded buffer (one compile)."""
  graphdef, state = nnx.split(model)
  width = len(prompt) + steps

  @jax.jit
  def next_token(state, tokens, length):
    seg = (jnp.arange(width) < length).astype(jnp.int32)[None]
    logits = nnx.merge(graphdef, state)(tokens, positions_from_segments(seg), seg).logits
    return jnp.argmax(logits[0, length - 1])

  tokens = jnp.zeros((1, width), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
  for k in range(steps):
    n = len(prompt) + k
    tokens = tokens.at[0, n].set(next_token(state, tokens, n))
  return [int(t) for t in tokens[0, len(prompt):]]


def _cut(row, eos):
  return row[:next((k + 1 for k, t in enumerate(row) if t == eos), len(row))]


def test_greedy_generate_equals_full_recomputation_and_stops_at_eos():
  model = init_model(tiny_config("qwen3"), seed=4)
  prompts = [[5, 17, 3, 99, 42], [7, 8]]
  expected = [_naive(model, p, 6) for p in prompts]
  assert greedy_generate(model, prompts, max_new_tokens=6, eos_ids=(127,), pad_id=0) == expected
  eos = expected[0][1]  # declared an EOS: rows stop after its first occurrence
  out = greedy_generate(model, prompts, max_new_tokens=6, eos_ids=(eos,), pad_id=0)
  assert out == [_cut(row, eos) for row in expected]
