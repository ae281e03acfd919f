"""Splash attention (Pallas TPU kernel) against our XLA attention, in interpret mode on CPU,
plus an ahead-of-time compile for a TPU topology (needs libtpu, i.e. jax[tpu]).

Tolerances are those of the cuDNN checks in tests/test_gpu.py: relative error (norm of the
difference over the norm of the float32 reference, real queries only) at most
max(2 x our own einsum attention's error, 1e-3); in float32 that is 1e-3 (measured ~3e-7).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from mopd_jax import config_lib
from mopd_jax.models import splash
from mopd_jax.models.splash import block_and_length, compiling_for_tpu, splash_attention, use_interpret
from mopd_jax.models.transformer import attention_mask, grouped_attention
from mopd_jax.sharding import MeshConfig, make_mesh

D = 16


def _rows(layout: str, t: int) -> np.ndarray:
  """[2, t] segment ids: left + right padding, or packed rows (2 and 3 segments)."""
  if layout == "padded":
    return np.asarray([[0] * (t // 3) + [1] * (t - t // 3), [1] * (t // 2 + 5) + [0] * (t - t // 2 - 5)])
  a, b = t // 3, t // 2
  return np.asarray([[1] * a + [2] * (t - a - 7) + [0] * 7, [1] * 9 + [2] * (b - 9) + [3] * (t - b)])


def _inputs(seed: int, b: int, t: int, h: int, kvh: int, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, D)), dtype)
  k = jnp.asarray(rng.standard_normal((b, t, kvh, D)), dtype)
  v = jnp.asarray(rng.standard_normal((b, t, kvh, D)), dtype)
  return q, k, v


def _xla_attention(q, k, v, seg):
  """The model's XLA path: mask from segments and slots, k/v in the cache layout."""
  slots = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
  mask = attention_mask(seg, slots, seg)
  return grouped_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def _relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _weighted_sum(attend, seg, cotangent):
  """sum(out * cotangent * query_mask): padding queries' outputs do not count."""
  real = (seg != 0)[:, :, None, None]
  return lambda q, k, v: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) * cotangent * real)


@pytest.mark.parametrize("t, block, length", [
    (64, 128, 128), (100, 128, 128), (128, 128, 128), (200, 256, 256), (300, 128, 384), (512, 512, 512),
    (640, 128, 640), (768, 256, 768)])
def test_default_block_divides_t_rounded_up_to_128(t, block, length):
  assert block_and_length(t) == (block, length)


def test_explicit_block_size_pads_to_its_multiple_and_must_be_a_multiple_of_128():
  assert block_and_length(300, 256) == (256, 512)
  with pytest.raises(ValueError, match="multiple of 128"):
    block_and_length(64, 64)


def test_interpret_unless_compiling_for_tpu():
  assert use_interpret() is (jax.default_backend() != "tpu")
  with compiling_for_tpu():
    assert use_interpret() is False
    assert use_interpret(True) is True  # an explicit choice wins
  assert use_interpret() is (jax.default_backend() != "tpu")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("t", [64, 128, 200])
def test_forward_matches_xla_attention_on_real_queries(t, heads, layout):
  seg = jnp.asarray(_rows(layout, t))
  q, k, v = _inputs(t, 2, t, *heads)
  out = jax.jit(splash_attention)(q, k, v, seg)
  ref = _xla_attention(q, k, v, seg)
  real = np.asarray(seg != 0)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.isfinite(np.asarray(out)).all()  # padding queries too
  assert _relative_error(np.asarray(out)[real], np.asarray(ref)[real]) < 1e-3


@pytest.mark.parametrize("t", [100, 300])
def test_padding_to_the_block_does_not_change_real_outputs(t):
  """T not a multiple of 128; a larger explicit block adds more padding slots: same result."""
  seg = jnp.asarray(_rows("packed", t))
  q, k, v = _inputs(1, 2, t, 4, 2)
  ref = _xla_attention(q, k, v, seg)
  real = np.asarray(seg != 0)
  for block in (None, 512):
    out = jax.jit(lambda *a: splash_attention(*a, block_size=block))(q, k, v, seg)
    assert _relative_error(np.asarray(out)[real], np.asarray(ref)[real]) < 1e-3


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("t", [64, 200])
def test_gradients_match_xla_attention(t, layout):
  seg = jnp.asarray(_rows(layout, t))
  q, k, v = _inputs(2 * t, 2, t, 4, 2)
  cotangent = jnp.asarray(np.random.RandomState(3).standard_normal(q.shape), jnp.float32)
  grads = jax.jit(jax.grad(_weighted_sum(splash_attention, seg, cotangent), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.grad(_weighted_sum(_xla_attention, seg, cotangent), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, ref):
    assert np.isfinite(np.asarray(g)).all(), name
    assert _relative_error(g, r) < 1e-3, name


def test_bfloat16_is_as_close_to_float32_as_xla_attention_in_bfloat16():
  t = 200
  seg = jnp.asarray(_rows("packed", t))
  q, k, v = _inputs(5, 2, t, 4, 2)
  real = np.asarray(seg != 0)
  cotangent = jnp.asarray(np.random.RandomState(4).standard_normal(q.shape), jnp.float32)
  bf16 = lambda *a: tuple(x.astype(jnp.bfloat16) for x in a)

  def run(attend, args):
    out = jax.jit(attend)(*args, seg)
    grads = jax.jit(jax.grad(_weighted_sum(attend, seg, cotangent), argnums=(0, 1, 2)))(*args)
    return out, grads

  ref_out, ref_grads = run(_xla_attention, (q, k, v))
  errors = {}
  for name, attend in (("xla", _xla_attention), ("splash", splash_attention)):
    out, grads = run(attend, bf16(q, k, v))
    assert out.dtype == jnp.bfloat16
    errors[name] = (_relative_error(np.asarray(out.astype(jnp.float32))[real], np.asarray(ref_out)[real]),
                    max(_relative_error(g.astype(jnp.float32), r) for g, r in zip(grads, ref_grads)))
  print(f"bf16 relative error vs float32 (output, worst gradient): {errors}")
  assert errors["splash"][0] <= max(2 * errors["xla"][0], 1e-3) and errors["splash"][0] < 2e-2
  assert errors["splash"][1] <= max(2 * errors["xla"][1], 1e-3) and errors["splash"][1] < 1e-1


def test_under_a_mesh_runs_per_shard_and_equals_the_unsharded_result():
  mesh = make_mesh(MeshConfig(2, 2, 2))
  t = 128
  seg = jnp.asarray(np.concatenate([_rows("padded", t), _rows("packed", t)]))
  q, k, v = _inputs(6, 4, t, 4, 2)
  cotangent = jnp.asarray(np.random.RandomState(7).standard_normal(q.shape), jnp.float32)

  def out_and_grads(q, k, v, seg):
    f = lambda q, k, v: _weighted_sum(splash_attention, seg, cotangent)(q, k, v)
    return splash_attention(q, k, v, seg), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  expected = jax.jit(out_and_grads)(q, k, v, seg)
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  rows = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = (*(jax.device_put(x, heads) for x in (q, k, v)), jax.device_put(seg, rows))
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(splash_attention)(*args))
    got = jax.jit(out_and_grads)(*args)
  assert got[0].sharding.is_equivalent_to(heads, 4)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_heads_are_replicated_when_tensor_does_not_divide_them():
  mesh = make_mesh(MeshConfig(2, 2, 2))
  assert splash._specs(mesh, 4, 4, 2) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None))
  assert splash._specs(mesh, 4, 4, 1) == (P(("data", "fsdp"), None, None, None), P(("data", "fsdp"), None))
  assert splash._specs(mesh, 2, 4, 2)[1] == P(None, None)  # 2 rows over 4 batch shards: replicated


def _tpu_topology():
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # noqa: BLE001 - any failure here means the TPU compiler is unavailable
    pytest.fail(f"compiling for a TPU needs libtpu (pip install 'jax[tpu]', listed in the test "
                f"requirements); get_topology_desc failed: {e!r}")


def test_compiles_for_a_tpu_topology_ahead_of_time():
  """Forward + backward through the compiled Pallas kernels (no interpreter), bf16, sharded."""
  topology = _tpu_topology()
  mesh = make_mesh(MeshConfig(2, 1, 2), devices=topology.devices)
  b, t, h, kvh, d = 4, 256, 4, 2, 64
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=heads)
  kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16, sharding=heads)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
  loss = lambda q, k, v, s: jnp.sum(splash_attention(q, k, v, s).astype(jnp.float32) ** 2)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  with jax.set_mesh(mesh), compiling_for_tpu():
    compiled = step.lower(q, kv, kv, seg).compile()
  text = compiled.as_text()
  kernels = set(re.findall(r"splash_mha_(fwd|dq|dkv)[\w.]*\s*=.*tpu_custom_call", text))
  assert kernels == {"fwd", "dq", "dkv"}, kernels
  assert "all-gather" not in text  # each device attends over its own rows and heads


def _tiny_config(attention_impl: str = "splash", **model):
  c = tiny.get_config(None)
  c.model.attention_impl = attention_impl
  for key, value in model.items():
    c.model[key] = value
  return c


@pytest.mark.parametrize("platform", ["cpu", "gpu", None])
def test_validate_rejects_splash_off_tpu(platform):
  """Needs "splash" in models.config.ATTENTION_IMPLS."""
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.attention_impl: 'splash' is the Pallas TPU .*'cudnn'.*'xla'"):
    config_lib.validate(_tiny_config(), platform=platform)


def test_validate_accepts_splash_on_tpu():
  """Needs "splash" in models.config.ATTENTION_IMPLS."""
  config_lib.validate(_tiny_config(), platform="tpu")


def test_validate_checks_cudnn_against_the_target_platform():
  c = _tiny_config(attention_impl="cudnn", dtype="bfloat16")
  config_lib.validate(c, platform="gpu")
  with pytest.raises(config_lib.ConfigError, match=r"'cudnn' needs an NVIDIA GPU backend; this run targets 'tpu'"):
    config_lib.validate(c, platform="tpu")
