"""Orbax round trips: bit-exact, shardings restored, a failed save keeps the last good step;
checksums: a corrupt, truncated or empty step is reported and the run falls back to the
previous good one; a checkpoint of another model is refused naming the first mismatch."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default as default_config
from config_tools import override
from mopd_jax import checkpointing, sharding, trainer
from mopd_jax.models import init_model, tiny_config
from mopd_jax.weights import loading as model_loading


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


# ----------------------------------------------------------------------------- checksums


def _digest_hex(x):
  return checkpointing.array_digests({"x": x})["x"]


def test_digest_is_independent_of_sharding_and_sees_one_flipped_bit():
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  P = jax.sharding.PartitionSpec
  x = jax.random.normal(jax.random.key(0), (8, 16, 12))
  layouts = [jax.device_put(x, jax.devices()[0]),
             jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data", "fsdp", "tensor"))),
             jax.device_put(x, jax.sharding.NamedSharding(mesh, P(None, ("fsdp", "data"), None)))]
  digests = {_digest_hex(a) for a in layouts}
  assert len(digests) == 1  # a checkpoint saved on one mesh verifies when restored onto another
  bits = np.asarray(x).view(np.uint32).copy()
  bits[3, 5, 7] ^= 1 << 11
  assert _digest_hex(jnp.asarray(bits.view(np.float32))) not in digests
  swapped = np.asarray(x).copy()
  swapped[0, 0, 0], swapped[0, 0, 1] = swapped[0, 0, 1], swapped[0, 0, 0]
  assert _digest_hex(jnp.asarray(swapped)) not in digests
  # Every dtype a train state holds: narrow floats, ints, bools, scalars, key data, empty.
  for y in (x.astype(jnp.bfloat16), jnp.arange(5, dtype=jnp.int32), jnp.array([True, False]),
            jnp.float32(np.nan), jax.random.key_data(jax.random.key(1)), jnp.zeros((0, 3))):
    d = _digest_hex(y)
    assert isinstance(d, str) and len(d) == 16
  assert _digest_hex(jnp.float32(0.0)) != _digest_hex(jnp.float32(-0.0))


def _tiny_config(ckpt_dir, log_dir, **overrides):
  c = default_config.get_config("tiny")
  c.eval.at_start = c.eval.at_end = False
  c.checkpoint.dir, c.logging.dir = str(ckpt_dir), str(log_dir)
  c.checkpoint.every = 1
  return override(c, overrides)


@pytest.fixture(scope="module")
def trained_checkpoints(tmp_path_factory):
  """A real trainer checkpoint directory: the tiny model trained 2 steps, saved (async) after each."""
  root = tmp_path_factory.mktemp("trained")
  trainer.train(_tiny_config(root / "ck", root / "log", **{"train.steps": 2}))
  return root / "ck"


@pytest.fixture
def run_dir(trained_checkpoints, tmp_path):
  dst = tmp_path / "ck"
  shutil.copytree(trained_checkpoints, dst)
  return dst


def _largest_array_file(step_dir) -> str:
  files = glob.glob(os.path.join(str(step_dir), "arrays", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_bytes(path, count=64) -> None:
  data = bytearray(open(path, "rb").read())
  for i in range(count):
    data[len(data) // 3 + 97 * i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _raw_arrays(directory, step):
  """A step's arrays as orbax reads them, unverified (the reference for what a step holds)."""
  return checkpointing.RunCheckpointer(directory, async_save=False)._manager.restore(step)["arrays"]


def _same(a, b) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TENSOR = r"(state|teacher)\.[\w.]+\.value"  # a tensor path, e.g. state.opt_state.1.0.nu.layers.mlp.up_proj.kernel.value


def _corrupt(step_dir, kind: str) -> str:
  """Damage one step; returns a pattern for what the report must name (a tensor path or a file)."""
  step_dir = str(step_dir)
  if kind == "flip":
    # Where the bytes land decides who notices first: the storage layer (a compressed chunk no
    # longer decodes) or the digest (it decodes to other values). Either names the tensor.
    _flip_bytes(_largest_array_file(step_dir))
    return TENSOR + r": (digest mismatch|Error reading)"
  if kind == "digest":
    # Data that reads back fine but is not what was saved: the digest alone can tell.
    path = os.path.join(step_dir, "checksums", "metadata")
    record = json.load(open(path))
    name = sorted(record["arrays"])[0]
    digest = record["arrays"][name]["digest"]
    record["arrays"][name]["digest"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    json.dump(record, open(path, "w"))
    return re.escape(name) + r": digest mismatch"
  if kind == "truncate":
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    return TENSOR
  if kind == "delete_file":
    os.remove(_largest_array_file(step_dir))
    return TENSOR
  if kind == "manifest":
    open(os.path.join(step_dir, "arrays", "manifest.ocdbt"), "wb").write(b"xx")
    return "manifest.ocdbt"
  if kind == "array_metadata":
    open(os.path.join(step_dir, "arrays", "_METADATA"), "w").write("{not json")
    return "2/arrays/_METADATA unreadable"
  if kind == "position":
    open(os.path.join(step_dir, "position", "metadata"), "w").write("{not json")
    return "2/position/metadata unreadable"
  if kind == "checksums":
    open(os.path.join(step_dir, "checksums", "metadata"), "w").write("{not json")
    return "2/checksums/metadata unreadable"
  if kind == "checksums_missing":
    shutil.rmtree(os.path.join(step_dir, "checksums"))
    return "checksums"
  if kind == "empty":
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
    return "empty"
  raise ValueError(kind)


CORRUPTIONS = ["flip", "digest", "truncate", "delete_file", "manifest", "array_metadata", "position", "checksums", "checksums_missing",
               "empty"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_damaged_latest_step_falls_back_to_the_previous_one(run_dir, kind):
  expected = _raw_arrays(run_dir, 1)
  named = _corrupt(run_dir / "2", kind)
  warnings = []
  ckpt = checkpointing.RunCheckpointer(run_dir, async_save=False)
  arrays, position = ckpt.restore(expected, warn=warnings.append)
  assert position.step == 1
  _same(arrays, expected)
  assert len(warnings) == 1 and "step 2" in warnings[0] and re.search(named, warnings[0]), warnings
  assert len(warnings[0]) < 1000
  # Set aside, not deleted, and no longer a step: orbax neither counts it against `keep` nor
  # refuses to save a step <= its number.
  assert ckpt.all_steps() == [1]
  assert os.listdir(run_dir / checkpointing.QUARANTINE_DIR) == ["2"]


def test_a_step_saved_before_checksums_existed_restores_with_a_warning(run_dir):
  expected = _raw_arrays(run_dir, 2)
  shutil.rmtree(run_dir / "2" / "checksums")
  meta = run_dir / "2" / "_CHECKPOINT_METADATA"
  record = json.loads(meta.read_text())
  del record["item_handlers"]["checksums"]
  meta.write_text(json.dumps(record))
  warnings = []
  arrays, position = checkpointing.RunCheckpointer(run_dir, async_save=False).restore(expected, warn=warnings.append)
  assert position.step == 2
  _same(arrays, expected)
  assert len(warnings) == 1 and "no checksums" in warnings[0] and "unverified" in warnings[0]


def test_every_step_corrupt_is_a_clear_error_and_nothing_is_moved(run_dir):
  like = _raw_arrays(run_dir, 1)
  _flip_bytes(_largest_array_file(run_dir / "1"))
  _corrupt(run_dir / "2", "truncate")
  ckpt = checkpointing.RunCheckpointer(run_dir, async_save=False)
  with pytest.raises(checkpointing.CheckpointCorruptError) as e:
    ckpt.restore(like, warn=lambda m: None)
  message = str(e.value)
  assert "step 1" in message and "step 2" in message and "no good checkpoint" in message
  assert len(message) < 2000
  assert ckpt.all_steps() == [1, 2]  # a rerun meets the same error instead of starting from scratch


def test_after_a_fallback_later_saves_keep_the_good_step(run_dir):
  like = _raw_arrays(run_dir, 1)
  _flip_bytes(_largest_array_file(run_dir / "2"))
  ckpt = checkpointing.RunCheckpointer(run_dir, keep=1, async_save=True)
  arrays, position = ckpt.restore(like, warn=lambda m: None)
  assert position.step == 1
  for step in (2, 3):
    ckpt.save(step, arrays, checkpointing.RunPosition(step=step, data_position=2 * step))
    ckpt.wait()
  # keep=1 would have deleted step 1; it is this run's verified fallback, so it stays.
  assert ckpt.all_steps() == [1, 3]
  ckpt.close()
  fresh = checkpointing.RunCheckpointer(run_dir, keep=1, async_save=False)
  warnings = []
  _, position = fresh.restore(like, warn=warnings.append)
  assert position.step == 3 and not warnings


def test_trainer_resumes_from_the_previous_step_when_the_latest_has_flipped_bytes(run_dir, tmp_path, capsys):
  """The attack: 64 flipped bytes in the latest step. The trainer warns naming the step and the
  tensor, resumes from the step before, trains on, and its new checkpoint verifies."""
  expected = _raw_arrays(run_dir, 1)
  _flip_bytes(_largest_array_file(run_dir / "2"))
  c = _tiny_config(run_dir, tmp_path / "log", **{"train.steps": 2, "checkpoint.keep": 1})
  run = trainer.setup(c)
  err = capsys.readouterr().err
  assert "checkpoint step 2" in err and re.search(TENSOR + ": (digest mismatch|Error reading)", err), err
  assert run.position.step == 1
  _same(run.checkpoint_arrays()["state"].params, expected["state"]["params"])
  run.checkpointer.close()
  summary = trainer.train(c)
  assert summary.steps == 2
  ckpt = checkpointing.RunCheckpointer(run_dir, async_save=False)
  assert ckpt.all_steps() == [1, 2]  # keep=1, but step 1 was this run's fallback
  warnings = []
  arrays, position = ckpt.restore(expected, warn=warnings.append)
  assert position.step == 2 and not warnings
  for leaf in jax.tree.leaves(arrays):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


# ----------------------------------------------------------------------------- another model


def test_checkpoint_of_another_model_is_refused_naming_the_first_mismatch(run_dir):
  like = _raw_arrays(run_dir, 2)
  kernel = like["state"]["params"]["layers"]["mlp"]["gate_up_proj"]["kernel"]["value"]
  like["state"]["params"]["layers"]["mlp"]["gate_up_proj"]["kernel"]["value"] = jnp.zeros(
      (kernel.shape[0], 32, 2, 96), kernel.dtype)
  ckpt = checkpointing.RunCheckpointer(run_dir, async_save=False)
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    ckpt.restore(like, warn=lambda m: pytest.fail(f"a mismatch is not corruption: {m}"))
  message = str(e.value)
  assert len(message) < 1000, message
  assert (f"state.params.layers.mlp.gate_up_proj.kernel.value: checkpoint {tuple(kernel.shape)} vs model "
          f"({kernel.shape[0]}, 32, 2, 96)") in message
  assert ckpt.all_steps() == [1, 2]  # nothing set aside: the checkpoint is fine, the model differs


def test_trainer_refuses_a_checkpoint_of_another_model_in_one_line(run_dir, tmp_path, monkeypatch):
  wider = tiny_config("llama", intermediate_size=96, vocab_size=49152)
  monkeypatch.setattr(model_loading, "get_preset", lambda name: wider)
  c = _tiny_config(run_dir, tmp_path / "log")
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    trainer.setup(c)
  message = str(e.value)
  assert len(message) < 1000, message
  assert "checkpoint (2, 64, 2, 128) vs model (2, 64, 2, 96)" in message or "checkpoint (2, 128, 64) vs model (2, 96, 64)" in message
  assert "state." in message and "layers.mlp" in message


def test_a_checkpoint_of_the_other_projection_layout_is_refused_naming_a_tensor(run_dir, tmp_path, monkeypatch):
  """Saved with fused projections (the default), resumed without: the parameters have other names."""
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    trainer.setup(_tiny_config(run_dir, tmp_path / "log", **{"model.fused_projections": False}))
  message = str(e.value)
  assert len(message) < 1000, message
  assert re.search(r"holds another model: state\.[\w.]+\.(gate|up|q|k|v)_proj\.kernel\.value: model \(2, \d+, \d+\), "
                   r"not in the checkpoint \(and \d+ more mismatching tensors\)", message), message


def test_a_checkpoint_with_another_optimizer_state_says_so(run_dir):
  """Same params, another optimizer layout (a run saved before apply_if_finite wrapped Adam)."""
  like = _raw_arrays(run_dir, 2)
  like["state"]["opt_state"] = {"notfinite_count": jnp.zeros((), jnp.int32), "inner_state": like["state"]["opt_state"]}
  ckpt = checkpointing.RunCheckpointer(run_dir, async_save=False)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="the same model with another optimizer state"):
    ckpt.restore(like, warn=lambda m: pytest.fail(f"a mismatch is not corruption: {m}"))
