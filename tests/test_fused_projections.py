"""Fused q/k/v and gate/up projections (ModelConfig.fused_projections): the layout, its logical
axes, and the same model as the separate projections on the same weights (`weights.relayout`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpr_tools import all_equations
from mopd_jax import sharding
from mopd_jax.models import KVCache, init_model, positions_from_segments, tiny_config
from mopd_jax.weights import relayout

FAMILIES = ["llama", "qwen2", "qwen3"]


def _perturbed(model):
  """Biases and norm scales away from their zeros/ones init, so that they matter."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  rng = np.random.RandomState(7)
  leaves = [x + jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype) if ("bias" in p or "scale" in p) else x
            for p, x in zip(paths, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _logits(model, tokens, seg):
  """(full forward, 5-token prefill into a cache then one-token decode steps) logits, jitted."""
  graphdef, state = nnx.split(model)
  pos = positions_from_segments(seg)

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    prefill = m(tokens[:, :5], pos[:, :5], seg[:, :5], KVCache.empty(m.config, tokens.shape[0], tokens.shape[1] + 3))

    def step(cache, t):  # one compiled decode step for all of them
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
      out = m(take(tokens), take(pos), take(seg), cache)
      return out.cache, out.logits[:, 0]

    _, decoded = jax.lax.scan(step, prefill.cache, jnp.arange(5, tokens.shape[1]))
    return m(tokens, pos, seg).logits, jnp.concatenate([prefill.logits, decoded.swapaxes(0, 1)], axis=1)

  return [np.asarray(x) for x in run(state)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("length", [9, 24])
def test_fused_equals_unfused_on_the_same_weights(family, kv_heads, length):
  fused = _perturbed(init_model(tiny_config(family, num_kv_heads=kv_heads), seed=1))
  unfused = relayout(fused, fused.config.replace(fused_projections=False))
  again = relayout(unfused, fused.config)
  for a, b in zip(jax.tree.leaves(nnx.state(fused, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    assert np.array_equal(a, b)  # the round trip through the other layout moves values only
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (3, length)))
  half = length // 2
  seg = jnp.asarray([[0] * 3 + [1] * (length - 3), [1] * length, [1] * half + [2] * (length - half)])
  for a, b in zip(_logits(fused, tokens, seg), _logits(unfused, tokens, seg)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_layout_and_logical_axes():
  cfg = tiny_config("qwen2", num_heads=6, num_kv_heads=2, head_dim=8)
  state = nnx.state(init_model(cfg), nnx.Param)
  specs = nnx.get_partition_spec(state)
  attn, mlp = state["layers"]["self_attn"], state["layers"]["mlp"]
  assert set(attn) == {"qkv_proj", "o_proj"} and set(mlp) == {"gate_up_proj", "down_proj"}
  assert attn["qkv_proj"]["kernel"].value.shape == (2, 64, 2, 3 + 2, 8)  # per kv head: 3 queries, key, value
  assert attn["qkv_proj"]["bias"].value.shape == (2, 2, 5, 8)
  assert mlp["gate_up_proj"]["kernel"].value.shape == (2, 64, 2, 128)
  names = lambda *keys: tuple(specs["layers"][keys[0]][keys[1]][keys[2]].value)
  assert names("self_attn", "qkv_proj", "kernel") == ("layers", "embed", "kv_heads", "fused", "head_dim")
  assert names("self_attn", "qkv_proj", "bias") == ("layers", "kv_heads", "fused", "head_dim")
  assert names("mlp", "gate_up_proj", "kernel") == ("layers", "embed", "fused", "mlp")
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  P = jax.sharding.PartitionSpec
  shardings = sharding.param_shardings(state, mesh)
  assert shardings["layers"]["self_attn"]["qkv_proj"]["kernel"].value.spec == P(None, "fsdp", "tensor", None, None)
  assert shardings["layers"]["mlp"]["gate_up_proj"]["kernel"].value.spec == P(None, "fsdp", None, "tensor")
  # Whole kv heads per device: a tensor axis that does not divide them is refused, naming the parameter.
  refused = r"qkv_proj/(kernel|bias) has shape .*dimension 2 is not divisible by mesh axes \('tensor',\)"
  with pytest.raises(ValueError, match=refused):
    sharding.param_shardings(state, sharding.make_mesh(sharding.MeshConfig(1, 2, 4)))


def test_a_decode_step_runs_three_fewer_matmuls_per_layer():
  def dots(cfg):
    model = init_model(cfg)
    graphdef, state = nnx.split(model)
    cache = KVCache.empty(cfg, 2, 8)
    one = jnp.ones((2, 1), jnp.int32)
    step = lambda s: nnx.merge(graphdef, s)(one, one, one, cache).logits
    return sum(e.primitive.name == "dot_general" for e in all_equations(jax.make_jaxpr(step)(state).jaxpr))

  cfg = tiny_config("llama", num_layers=1)
  assert dots(cfg.replace(fused_projections=False)) - dots(cfg) == 3  # q, k, v -> qkv; gate, up -> gate_up
