"""Checks that need an NVIDIA GPU: cuDNN flash attention against our XLA attention.

The suite runs on CPU (conftest sets JAX_PLATFORMS=cpu unless it is already set), so these
are skipped there. Run them on a GPU machine with

    JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mopd_jax.models import init_model, positions_from_segments, tiny_config

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention)")


def _loss_and_grads(cfg, params, tokens, seg, weights):
  graphdef = nnx.graphdef(init_model(cfg, seed=0))

  def loss(p):
    model = nnx.merge(graphdef, p)
    logits = model(tokens, positions_from_segments(seg), seg).logits
    return jnp.sum(logits * weights), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, grads


def _relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cudnn_attention_matches_xla_attention_in_logits_and_gradients(family):
  """bf16 with cuDNN is as close to a float32 reference as our own bf16 einsum attention is,
  on rows with left padding, right padding and two packed segments (real positions only)."""
  t = 80
  base = tiny_config(family, num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256, num_layers=2)
  rng = np.random.RandomState(7)
  tokens = jnp.asarray(rng.randint(0, base.vocab_size, (4, t)))
  seg = jnp.asarray([[0] * 17 + [1] * (t - 17), [1] * 50 + [0] * (t - 50), [1] * 30 + [2] * (t - 30), [1] * t])
  real = np.asarray(seg != 0)
  weights = jnp.asarray(rng.standard_normal((4, t, base.vocab_size)), jnp.float32) * real[..., None]
  params = nnx.split(init_model(base.replace(param_dtype="float32"), seed=3), nnx.Param)[1]

  ref = _loss_and_grads(base.replace(dtype="float32"), params, tokens, seg, weights)
  xla = _loss_and_grads(base.replace(dtype="bfloat16"), params, tokens, seg, weights)
  cudnn = _loss_and_grads(base.replace(dtype="bfloat16", attention_impl="cudnn"), params, tokens, seg, weights)

  logit_err = {name: _relative_error(out[1][real], ref[1][real]) for name, out in (("xla", xla), ("cudnn", cudnn))}
  ref_grads = jax.tree.leaves(ref[2])
  grad_err = {name: max(_relative_error(g, r) for g, r in zip(jax.tree.leaves(out[2]), ref_grads))
              for name, out in (("xla", xla), ("cudnn", cudnn))}
  print(f"{family}: relative error vs float32, logits {logit_err}, worst gradient leaf {grad_err}")
  assert np.isfinite(np.asarray(cudnn[1])).all()
  assert logit_err["cudnn"] <= max(2 * logit_err["xla"], 1e-3) and logit_err["cudnn"] < 2e-2
  assert grad_err["cudnn"] <= max(2 * grad_err["xla"], 1e-3) and grad_err["cudnn"] < 1e-1


def test_cudnn_attention_never_crosses_segments():
  """Changing the tokens of one packed segment leaves the other segment's logits unchanged."""
  cfg = tiny_config("llama", num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256,
                    dtype="bfloat16", attention_impl="cudnn")
  model = init_model(cfg, seed=1)
  seg = jnp.asarray([[1] * 24 + [2] * 40])
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 64)))
  other = tokens.at[:, :24].set((tokens[:, :24] + 1) % cfg.vocab_size)
  run = jax.jit(lambda x: model(x, positions_from_segments(seg), seg).logits)
  np.testing.assert_array_equal(np.asarray(run(tokens))[:, 24:], np.asarray(run(other))[:, 24:])
