"""The trainer: config validation, every method end to end, resume equivalence, non-finite guard."""

import json
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import default as default_config  # noqa: E402
from mopd_jax import config_lib, trainer  # noqa: E402


def tiny(method="mopd", **overrides):
  c = default_config.get_config(f"tiny,method={method}")
  c.eval.at_start = False
  c.eval.at_end = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ----------------------------------------------------------------------------- validation

def test_prompts_per_step_is_per_optimizer_step_for_the_whole_run():
  c = tiny()
  with c.unlocked():
    c.data.prompts_per_step = 4
  assert trainer.prompts_per_process(c, 1) == 4 and trainer.prompts_per_process(c, 2) == 2
  with pytest.raises(config_lib.ConfigError, match=r"config.data.prompts_per_step: 4 prompts per step do not divide over 3"):
    trainer.prompts_per_process(c, 3)
  with c.unlocked():
    c.data.prompts_per_step = 3
    c.distributed.enabled, c.distributed.num_processes = True, 2
  with pytest.raises(config_lib.ConfigError, match=r"config.data.prompts_per_step: 3 prompts per step \(for the whole run\) do not divide over 2 processes"):
    config_lib.validate(c)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "ppo"}, r"config.method: unknown method 'ppo'"),
    ({"loss.alpha": 1.5}, r"config.loss.alpha: must be in \[0, 1\]"),
    ({"sampling.group_size": 1}, r"config.sampling.group_size: method 'mopd' needs >= 2 rollouts"),
    ({"data.task": "jsonl", "data.path": ""}, r"config.data.path: task 'jsonl' needs a data file"),
    ({"data.task": "jsonl", "data.path": "/nonexistent/train.jsonl"}, r"config.data.path: .* does not exist"),
    ({"mesh.data": 8, "data.prompts_per_step": 3}, r"config.data.prompts_per_step: 3 prompts per step"),
    ({"teacher.mode": "teleport"}, r"config.teacher.mode: unknown 'teleport'"),
    ({"model.attention_chunk": -64}, r"config.model.attention_chunk: must be an int >= 0"),
    ({"model.attention_impl": "flash"}, r"config.model.attention_impl: must be one of \('xla', 'cudnn', 'splash'\)"),
    ({"model.attention_impl": "splash"}, r"config.model.attention_impl: 'splash' is the Pallas TPU"),
    ({"model.remat_policy": "keep_it_all"}, r"config.model.remat_policy: must be one of \('nothing_saveable'"),
    ({"model.attention_impl": "cudnn"}, r"config.model.attention_impl: 'cudnn' needs an NVIDIA GPU backend"),
    ({"model.attention_impl": "cudnn", "model.dtype": "float32"}, r"config.model.attention_impl: 'cudnn' needs"),
    ({"method": "plain_opd"}, r"config.teacher.mode: method 'plain_opd' needs teacher.mode='external'"),
])
def test_bad_config_fails_before_any_compute(overrides, message):
  c = tiny()
  with c.unlocked():
    for key, value in overrides.items():
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=8)


def test_peer_label_overrides_reach_the_peer_config():
  c = tiny()
  c.mopd.overrides["labels"] = {"closing": "Solve it in one line."}
  config_lib.validate(c, num_devices=8)
  labels = config_lib.peer_config(c).labels
  assert labels.closing == "Solve it in one line." and labels.primary == "Correct solution:"
  c.mopd.overrides["labels"] = {"closng": "typo"}
  with pytest.raises(config_lib.ConfigError, match="config.mopd: PeerConfig.labels: unknown label 'closng'"):
    config_lib.validate(c, num_devices=8)


def test_default_config_closing_argument():
  c = default_config.get_config(None)
  assert config_lib.peer_config(c).labels.closing == default_config.CLOSINGS["one_line"]
  spec = config_lib.peer_config(default_config.get_config("closing=spec")).labels.closing
  assert spec == "Correctly solve the original question."
  with pytest.raises(ValueError, match="closing='short'"):
    default_config.get_config("closing=short")


def test_model_compute_switches_reach_the_model():
  model, _ = trainer.load_model_and_tokenizer("tiny-llama", "", "", "float32", "bfloat16", 0,
                                              remat=True, attention_chunk=64, attention_impl="cudnn")
  assert model.config.remat and model.config.attention_chunk == 64 and model.config.attention_impl == "cudnn"


def test_external_teacher_with_another_tokenizer_is_refused():
  class Tok:
    def __init__(self, vocab):
      self.vocab_size, self.eos_ids = vocab, (0,)

    def encode(self, text):
      return [ord(ch) % self.vocab_size for ch in text]

  trainer.check_same_tokenizer(Tok(300), Tok(300))
  with pytest.raises(config_lib.ConfigError, match="tokenizer differs"):
    trainer.check_same_tokenizer(Tok(300), Tok(301))


# ----------------------------------------------------------------------------- end to end

ALL_METHODS = sorted(set(config_lib.METHODS) - {"plain_opd"})


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS)
def test_tiny_run_of_every_method_has_finite_metrics(method, tmp_path):
  c = tiny(method, **{"logging.dir": str(tmp_path)})
  summary = trainer.train(c)
  assert summary.steps == 3
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["update_applied"] == 1.0
    assert 0.0 <= r["rollout/success_rate"] <= 1.0


@pytest.mark.slow
def test_plain_opd_with_external_teacher_runs(tmp_path):
  c = tiny("plain_opd", **{"logging.dir": str(tmp_path), "teacher.mode": "external",
                           "teacher.external_preset": "tiny-qwen3", "train.steps": 2})
  summary = trainer.train(c)
  assert summary.steps == 2


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(tmp_path):
  straight = tiny(**{"train.steps": 4, "checkpoint.dir": str(tmp_path / "a"), "checkpoint.every": 2,
                     "logging.dir": str(tmp_path / "la")})
  trainer.train(straight)

  first = tiny(**{"train.steps": 2, "checkpoint.dir": str(tmp_path / "b"), "checkpoint.every": 2,
                  "logging.dir": str(tmp_path / "lb")})
  trainer.train(first)
  resumed = tiny(**{"train.steps": 4, "checkpoint.dir": str(tmp_path / "b"), "checkpoint.every": 2,
                    "logging.dir": str(tmp_path / "lb")})
  trainer.train(resumed)

  from mopd_jax import checkpointing
  a = checkpointing.RunCheckpointer(tmp_path / "a", async_save=False)
  b = checkpointing.RunCheckpointer(tmp_path / "b", async_save=False)
  assert a.latest_step() == b.latest_step() == 4
  arrays_a = a._manager.restore(4)["arrays"]
  arrays_b = b._manager.restore(4)["arrays"]
  for x, y in zip(jax.tree.leaves(arrays_a), jax.tree.leaves(arrays_b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  rows_a = [json.loads(l) for l in open(tmp_path / "la" / "metrics.jsonl")]
  rows_b = [json.loads(l) for l in open(tmp_path / "lb" / "metrics.jsonl")]
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
  for ra, rb in zip(rows_a, rows_b):
    for key in ("loss", "grad_norm", "rollout/success_rate", "rollout/response_len_mean"):
      assert ra[key] == pytest.approx(rb[key], abs=1e-6), key


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path):
  """Saved data parallel on one device, resumed with the model sharded fsdp x tensor: the run
  continues where it stopped (orbax restores each array straight into its new shards)."""
  # Large Adam eps: updates linear in the gradient, so the 4-device reduction order is noise only.
  common = {"data.prompts_per_step": 4, "optim.eps": 1e-4, "optim.lr": 1e-1, "checkpoint.every": 2}
  straight = tiny(**common, **{"train.steps": 4, "checkpoint.dir": str(tmp_path / "a"), "logging.dir": str(tmp_path / "la")})
  trainer.train(straight)
  first = tiny(**common, **{"train.steps": 2, "checkpoint.dir": str(tmp_path / "b"), "logging.dir": str(tmp_path / "lb")})
  trainer.train(first)
  resumed = tiny(**common, **{"train.steps": 4, "checkpoint.dir": str(tmp_path / "b"), "logging.dir": str(tmp_path / "lb"),
                              "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  run = trainer.setup(resumed)
  assert run.position.step == 2
  kernel = run.state.params["layers"]["mlp"]["gate_proj"]["kernel"].value
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  while run.position.step < 4:
    trainer.run_one_step(run)
  from mopd_jax import checkpointing
  reference = checkpointing.RunCheckpointer(tmp_path / "a", async_save=False)._manager.restore(4)["arrays"]
  state = reference["state"]
  expected = jax.tree.leaves(state.params if hasattr(state, "params") else state["params"])
  got = jax.tree.leaves(run.state.params)
  assert len(expected) == len(got) > 0
  for x, y in zip(expected, got):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.slow
def test_non_finite_updates_stop_the_run_and_keep_checkpoints(tmp_path, monkeypatch):
  c = tiny(**{"train.steps": 6, "checkpoint.dir": str(tmp_path / "ck"), "checkpoint.every": 1,
              "logging.dir": str(tmp_path / "log"), "train.max_nonfinite_in_a_row": 2})
  real_run_one_step = trainer.run_one_step
  calls = {"n": 0}

  def poisoned(run):
    calls["n"] += 1
    if calls["n"] == 2:  # from the second step on, the batch's rewards are NaN -> non-finite loss
      real_build = trainer.build_batch
      monkeypatch.setattr(trainer, "build_batch", lambda *a: _nan_batch(real_build(*a)))
    return real_run_one_step(run)

  monkeypatch.setattr(trainer, "run_one_step", poisoned)
  with pytest.raises(trainer.TrainingError, match="2 non-finite updates in a row"):
    trainer.train(c)
  from mopd_jax import checkpointing
  assert checkpointing.RunCheckpointer(tmp_path / "ck", async_save=False).latest_step() == 1


def _nan_batch(batch):
  return batch.replace(sampler_logprobs=np.full_like(batch.sampler_logprobs, np.nan))


@pytest.mark.parametrize("name", ["qwen3_8b_lcb", "qwen3_4b_math", "qwen3_8b_sciqa", "qwen3_8b_tooluse",
                                  "qwen3_14b_to_4b"])
def test_paper_configs_validate_given_data_and_fail_clearly_without(name, tmp_path):
  import importlib
  module = importlib.import_module(f"configs.{name}")
  data = tmp_path / "train.jsonl"
  data.write_text("{}\n")
  c = module.get_config(f"data={data}")
  config_lib.validate(c, num_devices=64, platform="tpu")  # the default target: v5p-64
  assert c.tpu.topology == "v5p:4x4x4" and c.model.attention_impl == "splash"
  with pytest.raises(config_lib.ConfigError, match="config.data.path"):
    config_lib.validate(module.get_config(None), num_devices=64, platform="tpu")
  with pytest.raises(config_lib.ConfigError, match="config.model.attention_impl: 'splash'"):
    config_lib.validate(c, num_devices=64, platform="gpu")  # a GPU run must choose its attention
  with pytest.raises(ValueError, match="unknown target 'v9-1'"):
    module.get_config("target=v9-1")
