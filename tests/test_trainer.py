"""The trainer: config validation, every method end to end, resume equivalence, non-finite guard."""

import json
import types

import jax
import numpy as np
import pytest

from configs import default as default_config  # noqa: E402
from config_tools import override  # noqa: E402
from mopd_jax import config_lib, methods, peers, rollouts, sampling, trainer  # noqa: E402
from mopd_jax.logging_lib import MetricsLogger  # noqa: E402
from mopd_jax.tasks import loading as task_loading  # noqa: E402
from mopd_jax.types import Verdict  # noqa: E402
from mopd_jax.weights import loading as model_loading  # noqa: E402


def tiny(method="mopd", **overrides):
  c = default_config.get_config(f"tiny,method={method}")
  c.eval.at_start = False
  c.eval.at_end = False
  return override(c, overrides)


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
    ({"loss.mismatch": "tis"}, r"config.loss.mismatch: 'tis' .*is_clip.*twice"),
    ({"loss.mismatch": "clip"}, r"config.loss.mismatch: unknown 'clip'; known: '' \(off\), 'mask'"),
    ({"loss.agg_norm": -1.0}, r"config.loss.agg_norm: must be > 0"),
    ({"grpo.clip_eps": 0.0}, r"config.grpo.clip_eps: must be > 0"),
    ({"grpo.clip_high": -0.1}, r"config.grpo.clip_high: must be > 0"),
    ({"grpo.clip_c": 1.0}, r"config.grpo.clip_c: must be > 1 \(dual clip\) or None \(off\)"),
    ({"method": "grpo", "grpo.clip_c": 1.0}, r"config.grpo.clip_c: must be > 1"),
    ({"dpo.beta": -1.0}, r"config.dpo.beta: must be > 0"),
    ({"simpo.max_pairs_per_group": 0}, r"config.simpo.max_pairs_per_group: must be an int >= 1"),
    ({"loss.full_logits": False}, r"config.loss.full_logits: False \(sampled-token mode\) needs alpha=1"),
    ({"optim.preference_lr": 0.0}, r"config.optim.preference_lr: must be > 0"),
])
def test_bad_config_fails_before_any_compute(overrides, message):
  c = override(tiny(), overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=8)


def test_grpo_clip_and_aggregation_options_reach_the_losses():
  """The authors' GRPO baseline clips at 0.2 / 0.28 with dual clip 3 (verl user.yaml, actor.yaml);
  grpo_clip_c 0 or None turns the dual clip off. seq-mean-token-sum-norm divides by a constant:
  by default the longest response (verl: loss_mask.shape[-1], the padded max_response_length),
  not this step's response bucket."""
  c = tiny("grpo")
  g = trainer.step_config(c).method.grpo
  assert (g.clip_eps, g.clip_high, g.clip_c, g.kl_coef) == (0.2, 0.28, 3.0, 0.001)
  for off in (0.0, None):
    with c.unlocked():
      c.grpo.clip_c = off
    config_lib.validate(c, num_devices=8)
    assert trainer.step_config(c).method.grpo.clip_c is None
  with c.unlocked():
    c.loss.loss_agg = "seq-mean-token-sum-norm"
  distill = methods.get("mopd").configured(c).distill
  assert distill.agg_norm == trainer.step_config(c).method.grpo.agg_norm == c.sampling.max_new_tokens
  with c.unlocked():
    c.loss.agg_norm = 4096.0
  distill = methods.get("mopd").configured(c).distill
  assert distill.agg_norm == trainer.step_config(c).method.grpo.agg_norm == 4096.0


def test_preference_methods_train_at_their_own_learning_rate():
  """DPO and SimPO ran at lr 1e-6 (the authors' dpo.yaml / simpo.yaml, run_local_dpo.sh /
  run_local_simpo.sh), every other method at optim.lr: optim.preference_lr is theirs."""
  for method, lr in [("dpo", 1e-6), ("simpo", 1e-6), ("mopd", 1e-3), ("grpo", 1e-3), ("verified_sft", 1e-3)]:
    c = tiny(method)
    assert c.optim.lr == 1e-3 and c.optim.preference_lr == 1e-6  # tiny sets optim.lr only
    assert config_lib.learning_rate(c) == lr
    _, schedule = trainer.optimizer_from_config(c)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(2))], lr, rtol=1e-6, err_msg=method)
  c = tiny("dpo", **{"optim.preference_lr": 5e-7, "optim.warmup_steps": 4})
  _, schedule = trainer.optimizer_from_config(c)
  np.testing.assert_allclose([float(schedule(2)), float(schedule(10))], [2.5e-7, 5e-7], rtol=1e-6)


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
  model, _ = model_loading.load_model_and_tokenizer("tiny-llama", "", "", "float32", "bfloat16", 0,
                                                    remat=True, attention_chunk=64, attention_impl="cudnn")
  assert model.config.remat and model.config.attention_chunk == 64 and model.config.attention_impl == "cudnn"


def test_external_teacher_with_another_tokenizer_is_refused():
  class Tok:
    def __init__(self, vocab):
      self.vocab_size, self.eos_ids = vocab, (0,)

    def encode(self, text):
      return [ord(ch) % self.vocab_size for ch in text]

  model_loading.check_same_tokenizer(Tok(300), Tok(300))
  with pytest.raises(config_lib.ConfigError, match="tokenizer differs"):
    model_loading.check_same_tokenizer(Tok(300), Tok(301))


# ----------------------------------------------------------------------------- end to end

ALL_METHODS = sorted(set(methods.METHODS) - {"plain_opd"})


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
  kernel = run.state.params["layers"]["mlp"]["gate_up_proj"]["kernel"].value
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
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


# ----------------------------------------------------------------- summaries variant, empty steps
# The trainer's own path (run_one_step) with scripted responses: the sampler returns fixed texts and
# a verifier marks "ok..." successes, so the peer contexts are known while the rest is real.

def _instruction() -> str:
  return peers.PeerLabels().summary_instruction


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
  c = tiny(**{"mopd.preset": "summaries", "data.prompt_buckets": (128,),  # the instruction lengthens prompts
              "logging.dir": str(tmp_path_factory.mktemp("scripted_run"))})
  run = trainer.setup(c)
  yield run
  run.logger.close()


class _ByPrefix:
  def verify(self, examples, texts, deadline_s=None):
    return [Verdict(1.0, True) if t.startswith("ok") else Verdict(0.0, False, feedback="Wrong.") for t in texts]


def _script(monkeypatch, run, texts, tmp_path):
  """Samples `texts` (cycled) for every prompt; returns the decoded prompts the sampler was given."""
  seen = []

  def sample(model, prompts, *, num_samples, rng, sampling_params, mesh=None, decode_fn=None, prompt_ids=None):
    seen.extend(run.tokenizer.decode(p) for p in prompts)
    rows = [texts[r % len(texts)] for r in range(len(prompts) * num_samples)]
    ids = [run.tokenizer.encode(t) for t in rows]
    n = sampling_params.max_new_tokens
    assert max(map(len, ids)) <= n, "scripted response longer than max_new_tokens"
    tokens = np.array([i + [run.tokenizer.pad_id] * (n - len(i)) for i in ids], np.int32)
    return types.SimpleNamespace(
        num_rows=len(rows), tokens=tokens, lengths=np.array([len(i) for i in ids]), texts=tuple(rows),
        scaled_logprobs=np.full(tokens.shape, -1.0, np.float32),
        finish_reasons=(sampling.FinishReason.STOP,) * len(rows))

  monkeypatch.setattr(rollouts.sampling_lib, "sample", sample)
  monkeypatch.setattr(run, "verifier_pool", _ByPrefix())
  monkeypatch.setattr(run, "logger", MetricsLogger(str(tmp_path), progress=False))
  return seen


def _peers(run, preset, **options):
  """A peer preset with the run's own overrides (teacher prompt limit, closing line)."""
  return peers.get_preset(preset, **{**dict(run.config.mopd.overrides), **options})


def _capture_contexts(monkeypatch):
  captured = []
  real = rollouts.with_teacher_contexts

  def with_teacher_contexts(*args, **kwargs):
    groups = real(*args, **kwargs)
    captured.append([g.contexts for g in groups])
    return groups

  monkeypatch.setattr(rollouts, "with_teacher_contexts", with_teacher_contexts)
  return captured


@pytest.mark.slow  # ~20 s: sets up a tiny run and compiles its train step once
def test_summaries_variant_through_the_trainer_distils_on_primary_plus_summaries(scripted_run, monkeypatch,
                                                                                  tmp_path, capsys):
  run = scripted_run
  texts = ["ok <summary>add</summary>", "no <summary>guess</summary>", "ok <summary>count</summary>",
           "ok <summary>carry</summary>"]  # S = {0, 2, 3}
  seen = _script(monkeypatch, run, texts, tmp_path)
  captured = _capture_contexts(monkeypatch)
  examples, _ = trainer.next_prompts(run)
  record = trainer.run_one_step(run)
  problems = [e.prompt[-1].content + "\n\n" + _instruction() for e in examples]
  assert len(seen) == len(examples) and all(p in s for p, s in zip(problems, seen))  # sampled under it
  expected = {0: (2, [3]), 1: (0, [2, 3]), 2: (0, [3]), 3: (0, [2])}  # rollout -> (primary, summarised)
  for problem, row in zip(problems, captured[-1]):
    for c in row:
      primary, summarised = expected[c.rollout]
      assert c.distill_mask == 1.0 and c.kinds == (peers.PRIMARY, peers.SUMMARIES)
      assert [p.index for p in c.section(peers.SUMMARIES).peers] == summarised
      # The teacher reads the problem as the student did (instruction included), then the peers.
      assert c.messages[-1].content == "\n\n".join([
          problem, "Correct solution:\n" + texts[primary],
          "Summaries of successful solutions:\n" + "\n".join(f"- {peers.extract_summary(texts[j])}"
                                                              for j in summarised),
          run.peer_config.labels.closing])
  assert record["peers/masked_frac"] == 0.0 and record["peers/all_masked_step"] == 0.0
  assert record["peers/summary_tag_frac"] == 1.0
  assert np.isfinite(record["loss"]) and record["update_applied"] == 1.0
  assert "WARNING" not in capsys.readouterr().err


@pytest.mark.slow  # ~20 s: sets up a tiny run and compiles its train step once
def test_student_prompt_carries_the_instruction_only_with_summaries(scripted_run, monkeypatch, tmp_path):
  run = scripted_run
  seen = _script(monkeypatch, run, ["ok <summary>add</summary>", "no"], tmp_path)
  monkeypatch.setattr(run, "peer_config", _peers(run, "sdpo"))
  trainer.run_one_step(run)
  assert seen and not any(_instruction() in p for p in seen)
  seen.clear()
  monkeypatch.setattr(run, "peer_config", _peers(run, "summaries"))
  trainer.run_one_step(run)
  assert seen and all(_instruction() in p for p in seen)
  seen.clear()
  trainer.evaluate(run, run.eval_examples[:2], jax.random.key(0))
  assert seen and not any(_instruction() in p for p in seen)  # evaluation samples the task's own prompt


@pytest.mark.slow  # ~20 s: sets up a tiny run and compiles its train step once
def test_a_step_with_every_context_empty_warns_and_sets_the_metric(scripted_run, monkeypatch, tmp_path, capsys):
  run = scripted_run
  _script(monkeypatch, run, ["ok 4", "no 5"], tmp_path)  # nobody writes a <summary>
  # The summaries-only reading: no summaries -> no section for anyone.
  monkeypatch.setattr(run, "peer_config", _peers(
      run, "summaries", summaries_replace_solutions=True, include_feedback=False))
  step = run.position.step
  record = trainer.run_one_step(run)
  assert record["peers/all_masked_step"] == 1.0 and record["peers/masked_frac"] == 1.0
  assert record["peers/summary_tag_frac"] == 0.0
  err = capsys.readouterr().err
  assert f"WARNING: step {step}: all 8 teacher contexts are empty" in err
  assert f"WARNING: step {step}: summaries variant: none of the 8 responses" in err


@pytest.mark.parametrize("eval_size, train, held_out", [(0, 5, 0), (2, 3, 2)])
def test_a_file_task_holds_out_its_tail_and_eval_size_zero_keeps_every_example(tmp_path, eval_size, train, held_out):
  """examples[:-0] is empty: eval_size 0 used to leave no training prompt (the first step then
  divided by zero)."""
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "verifier": "math", "reference": str(i + 1)}) + "\n"
                          for i in range(5)))
  c = tiny(**{"data.task": "jsonl", "data.path": str(path), "data.eval_size": eval_size, "data.options": {}})
  train_examples, eval_examples = task_loading.load_examples(c)
  assert (len(train_examples), len(eval_examples)) == (train, held_out)
  assert [e.reference for e in train_examples + eval_examples] == [str(i + 1) for i in range(5)]
