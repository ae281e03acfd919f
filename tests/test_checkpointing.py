"""Orbax round trips: bit-exact, shardings restored, a failed save keeps the last good step."""

import jax
import numpy as np
import pytest
from flax import nnx

from mopd_jax import checkpointing, sharding
from mopd_jax.models import init_model, tiny_config


def _sharded_params():
  state = nnx.state(init_model(tiny_config("qwen3"), seed=4), nnx.Param)
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  return sharding.shard_params(state, mesh)


def test_params_save_restore_bit_exact_with_same_shardings(tmp_path):
  params = _sharded_params()
  checkpointing.save_params(tmp_path / "p", params)
  restored = checkpointing.restore_params(tmp_path / "p", params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
    assert a.dtype == b.dtype


def test_failed_save_keeps_latest_good_checkpoint(tmp_path, monkeypatch):
  params = _sharded_params()
  ckpt = checkpointing.RunCheckpointer(tmp_path / "run", keep=2, async_save=False)
  ckpt.save(1, {"params": params}, checkpointing.RunPosition(step=1, data_position=8))
  ckpt.wait()

  bad = jax.tree.map(lambda x: x + 1, params)
  def crash(*args, **kwargs):
    raise RuntimeError("simulated crash while writing")
  # The crash hits after orbax created its temporary directory for step 2.
  monkeypatch.setattr(checkpointing.ocp.type_handlers.ArrayHandler, "serialize", crash)
  with pytest.raises(Exception):
    ckpt.save(2, {"params": bad}, checkpointing.RunPosition(step=2, data_position=16))
    ckpt.wait()
  monkeypatch.undo()

  fresh = checkpointing.RunCheckpointer(tmp_path / "run", keep=2, async_save=False)
  assert fresh.latest_step() == 1
  arrays, position = fresh.restore({"params": params})
  assert position == checkpointing.RunPosition(step=1, data_position=8)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(arrays["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
