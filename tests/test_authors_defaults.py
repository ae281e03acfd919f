"""The paper configs' defaults against the authors' runs (viviable/mopd_code), and the options
behind them: evaluation top-p, the overlong-prompt filter, the success threshold of graded
rewards, the authors' loss aggregation, MOPD with the external 14B teacher."""

import dataclasses
import importlib
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from configs import evaluate as evaluate_config
from config_tools import override
import fakes
from mopd_jax import config_lib, evaluate, losses, peers, rollouts, sharding, trainer
from mopd_jax.sampling import FinishReason
from mopd_jax.tasks import loading as task_loading
from mopd_jax.types import Example, Message, Verdict
from mopd_jax.verifiers.base import apply_success_threshold

PAPER_CONFIGS = ["qwen3_8b_lcb", "qwen3_4b_math", "qwen3_8b_sciqa", "qwen3_8b_tooluse", "qwen3_14b_to_4b"]


def _paper(name, tmp_path, arg=""):
  data = tmp_path / "train.jsonl"
  data.write_text("{}\n")
  return importlib.import_module(f"configs.{name}").get_config(",".join(filter(None, [f"data={data}", arg])))


def _tiny(**overrides):
  c = default_config.get_config("tiny")
  c.eval.at_start = c.eval.at_end = False
  return override(c, overrides)


@pytest.fixture(scope="module")
def tokenizer():
  return fakes.smollm2_tokenizer()


# ------------------------------------------------------------------------ paper configs

@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_take_the_authors_settings(name, tmp_path):
  c = _paper(name, tmp_path)
  assert c.sampling.enable_thinking is False  # user.yaml: enable_thinking false ("No-thinking" runs)
  assert (c.optim.warmup_steps, c.optim.weight_decay) == (10, 0.01)  # lr_warmup_steps=10; fsdp.yaml
  assert (c.eval.temperature, c.eval.top_p, c.eval.num_samples) == (0.6, 0.95, 8)  # val_kwargs, n=8
  assert (c.data.max_prompt_len, c.data.filter_overlong_prompts) == (2048, True)
  # The spec's values where the authors' scripts differ (recipe=authors below).
  assert c.sampling.max_new_tokens == c.eval.max_new_tokens == 8192 and c.loss.loss_agg == "token-mean"
  config_lib.validate(c, num_devices=64, platform="tpu")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_authors_recipe_takes_their_response_length_and_aggregation(name, tmp_path):
  c = _paper(name, tmp_path, "recipe=authors")
  assert c.sampling.max_new_tokens == c.eval.max_new_tokens == 4096  # mopd.sh ROLLOUT_RESPONSE_LENGTH
  assert max(c.data.response_buckets) == 4096
  assert c.loss.loss_agg == "seq-mean-token-mean-all-rows"
  assert c.logging.dir.endswith("-authors") and c.checkpoint.dir.startswith(c.logging.dir)
  assert c.sampling.enable_thinking is False and c.eval.top_p == 0.95  # shared settings stay
  config_lib.validate(c, num_devices=64, platform="tpu")
  assert _paper(name, tmp_path, "recipe=authors,method=verified_sft").optim.lr == 1e-6  # run_local_sft.sh
  assert _paper(name, tmp_path, "method=verified_sft").optim.lr == 1e-5  # the spec's
  with pytest.raises(ValueError, match="unknown recipe 'verl'"):
    _paper(name, tmp_path, "recipe=verl")


@pytest.mark.parametrize("method, mode", [
    ("mopd", "external"), ("sdpo", "external"), ("plain_opd", "external"), ("positive_only", "external"),
    ("grpo", "frozen"), ("dpo", "frozen"), ("verified_sft", "frozen")])
def test_14b_to_4b_teacher_follows_the_method(method, mode, tmp_path):
  c = _paper("qwen3_14b_to_4b", tmp_path, f"method={method}")
  assert c.method == method and c.teacher.mode == mode and c.model.preset == "qwen3-4b"
  if mode == "external":
    assert c.teacher.external_preset == "qwen3-14b"
    assert trainer.step_config(c).method.external_teacher  # never updated: a frozen teacher
  config_lib.validate(c, num_devices=64, platform="tpu")


def test_14b_to_4b_default_is_mopd_and_sdpo_is_the_authors_teacher_student_context(tmp_path):
  c = _paper("qwen3_14b_to_4b", tmp_path)
  assert c.method == "mopd" and c.teacher.mode == "external"
  mopd = config_lib.peer_config(c)
  assert mopd.include_primary and mopd.include_another and mopd.include_failure
  # run_ts_sdpo.sh: include_another_solution=False, include_failure_solution=False, the primary
  # (actor.yaml default), dont_reprompt_on_self_success=True, feedback only without a solution.
  ts = config_lib.peer_config(_paper("qwen3_14b_to_4b", tmp_path, "method=sdpo"))
  assert ts.include_primary and not ts.include_another and not ts.include_failure
  assert ts.exclude_self_success and ts.include_feedback and ts.feedback_only_without_solution
  assert _paper("qwen3_14b_to_4b", tmp_path, "recipe=authors").sampling.max_new_tokens == 4096


# ------------------------------------------------------------------------ evaluation top-p

def test_eval_top_p_defaults_to_one_and_is_validated():
  c = config_lib.base_config()
  assert c.eval.top_p == 1.0
  for bad in (0.0, 1.5):
    c = _tiny(**{"eval.top_p": bad})
    with pytest.raises(config_lib.ConfigError, match=r"config.eval.top_p: must be in \(0, 1\]"):
      config_lib.validate(c, num_devices=8)


def _fake_sampler_result(prompts, num_samples):
  rows = len(prompts) * num_samples
  return types.SimpleNamespace(
      num_rows=rows, lengths=np.full(rows, 2), tokens=np.ones((rows, 4), np.int32),
      scaled_logprobs=np.full((rows, 4), -1.0, np.float32), texts=("42",) * rows,
      finish_reasons=(FinishReason.STOP,) * rows)


class _FixedVerdicts:
  """A verifier pool whose every verdict is one graded reward (3 of 4 unit tests passed)."""

  def verify(self, examples, completions, deadline_s=None):
    return [Verdict(reward=0.75, success=False, feedback="test 4 failed") for _ in completions]


def _fake_run(config, tokenizer, calls, monkeypatch):
  def sample(model, prompts, *, num_samples, sampling_params, **kwargs):
    calls.append(sampling_params)
    return _fake_sampler_result(prompts, num_samples)

  return fakes.fake_sampler_run(config, tokenizer, sample, _FixedVerdicts(), monkeypatch)


def test_evaluation_samples_at_eval_top_p_and_training_at_sampling_top_p(tokenizer, monkeypatch):
  c = _tiny(**{"eval.top_p": 0.95, "eval.temperature": 0.6, "sampling.top_p": 0.9})
  calls = []
  run = _fake_run(c, tokenizer, calls, monkeypatch)
  run.sample_mesh = sharding.make_mesh(sharding.MeshConfig(-1, 1, 1))
  examples = [Example(prompt=(Message("user", f"q{i}"),), reference="42", verifier="math") for i in range(8)]
  result = trainer.evaluate(run, examples, jax.random.key(0))
  assert result.k == c.eval.num_samples and calls
  assert {(p.top_p, p.temperature) for p in calls} == {(0.95, 0.6)}
  calls.clear()
  rollouts.sample_and_verify(run, examples[:2], jax.random.key(1), group_size=2, temperature=1.0,
                             max_new_tokens=4, training=True)
  assert calls[0].top_p == 0.9  # training rollouts keep sampling.top_p


def test_evaluate_cli_samples_at_eval_top_p(tmp_path, monkeypatch):
  config = evaluate_config.get_config("tiny")
  config.evaluate.out_dir = str(tmp_path / "eval")
  config.eval.top_p = 0.95
  seen = []
  real = rollouts.sample_and_verify

  def recording(run, examples, rng, **kwargs):
    seen.append(kwargs["top_p"])
    return real(run, examples, rng, **kwargs)

  monkeypatch.setattr(rollouts, "sample_and_verify", recording)
  monkeypatch.setattr(rollouts.sampling_lib, "sample", lambda model, prompts, *, num_samples, **kw:
                      _fake_sampler_result(prompts, num_samples))  # no decoding: only the settings matter
  summary, _, paths = evaluate.evaluate(config)
  assert seen and set(seen) == {0.95} and summary.top_p == 0.95
  assert json.loads(paths.json.read_text())["top_p"] == 0.95 and "top-p 0.95" in paths.markdown.read_text()


# ------------------------------------------------------------------------ overlong prompts

def _examples(lengths, prefix="p"):
  return [Example(prompt=(Message("user", "word " * n),), reference="1", verifier="math", example_id=f"{prefix}{i}")
          for i, n in enumerate(lengths)]


def test_overlong_prompts_are_dropped_as_the_sampler_would_see_them(tokenizer):
  c = _tiny(**{"data.prompt_buckets": (64,)})  # max_prompt_len 0: the largest bucket
  train, held_out = _examples([5, 200, 10, 80]), _examples([3, 300], "e")
  kept, kept_eval, stats = task_loading.filter_prompts(c, tokenizer, config_lib.peer_config(c), train, held_out)
  assert [e.example_id for e in kept] == ["p0", "p2"] and [e.example_id for e in kept_eval] == ["e0"]
  assert (stats.max_prompt_len, stats.train_dropped, stats.train_kept, stats.eval_dropped) == (64, 2, 2, 1)
  assert "2 of 4 training, 1 of 2 eval" in stats.message()
  # The limit counts chat-templated tokens, not the text's.
  n = len(rollouts.chat_prompt_tokens(tokenizer, train[2].prompt, False))
  assert n > len(tokenizer.encode(train[2].prompt[0].content))
  c.data.max_prompt_len = n - 1
  assert [e.example_id for e in task_loading.drop_overlong_prompts(c, tokenizer, train, None, "training")[0]] == ["p0"]


def test_training_prompts_are_measured_with_their_instruction(tokenizer):
  """The summaries variant appends an instruction to training prompts only: a prompt that fits
  without it but not with it leaves training and stays in evaluation."""
  c = _tiny()
  summaries = dataclasses.replace(peers.PeerConfig(), use_summaries=True)
  example = _examples([10])
  plain = len(rollouts.chat_prompt_tokens(tokenizer, example[0].prompt, False))
  instructed = len(rollouts.chat_prompt_tokens(tokenizer, peers.student_prompt(example[0].prompt, summaries), False))
  assert instructed > plain
  c.data.max_prompt_len = plain
  assert task_loading.drop_overlong_prompts(c, tokenizer, example * 2, None, "eval")[1] == 0
  with pytest.raises(config_lib.ConfigError, match="all 2 training prompts are longer than"):
    task_loading.drop_overlong_prompts(c, tokenizer, example * 2, summaries, "training")


def test_overlong_prompt_without_the_filter_fails_at_load_time_naming_it(tokenizer):
  c = _tiny(**{"data.prompt_buckets": (64,), "data.filter_overlong_prompts": False})
  with pytest.raises(config_lib.ConfigError, match=r"filter_overlong_prompts=False: training prompt 1 \(example_id 'p1'\) "
                                                   r"has \d+ tokens .* over data.max_prompt_len=64"):
    task_loading.drop_overlong_prompts(c, tokenizer, _examples([5, 200]), None, "training")
  with pytest.raises(config_lib.ConfigError, match="all 1 eval prompts are longer than 64"):
    task_loading.drop_overlong_prompts(_tiny(**{"data.prompt_buckets": (64,)}), tokenizer, _examples([200]), None,
                                       "eval")


@pytest.mark.parametrize("value, message", [
    (65, r"config.data.max_prompt_len: 65 exceeds the largest prompt bucket 64"),
    (-1, r"config.data.max_prompt_len: must be an int >= 0"),
])
def test_max_prompt_len_must_fit_the_largest_prompt_bucket(value, message):
  c = _tiny(**{"data.prompt_buckets": (64,), "data.max_prompt_len": value})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=8)
  c.data.max_prompt_len = 64
  config_lib.validate(c, num_devices=8)
  assert config_lib.max_prompt_len(c) == 64 and config_lib.max_prompt_len(_tiny()) == max(_tiny().data.prompt_buckets)


def test_setup_filters_train_and_eval_prompts_and_logs_the_counts(tmp_path, capsys):
  lines = [{"id": f"q{i}", "prompt": ("word " * (200 if i in (1, 9) else 3)) + f"{i}+1?", "verifier": "math",
            "reference": str(i + 1)} for i in range(12)]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  c = _tiny(**{"data.task": "jsonl", "data.path": str(tmp_path / "train.jsonl"), "data.eval_size": 4,
               "logging.dir": str(tmp_path / "log")})
  c.data.options = {}
  run = trainer.setup(c)
  assert [e.example_id for e in run.train_examples] == [f"q{i}" for i in (0, 2, 3, 4, 5, 6, 7)]
  assert [e.example_id for e in run.eval_examples] == ["q8", "q10", "q11"]
  assert (run.prompt_filter.train_dropped, run.prompt_filter.eval_dropped) == (1, 1)
  assert "1 of 8 training, 1 of 4 eval" in capsys.readouterr().out


# ------------------------------------------------------------------------ success threshold

def test_success_threshold_counts_graded_rewards():
  graded = Verdict(reward=0.75, success=False, feedback="test 4 failed")  # the code verifier: 3 of 4 passed
  assert not apply_success_threshold(graded, 1.0).success  # default: the verifier's own (all pass)
  assert apply_success_threshold(graded, 0.75).success and apply_success_threshold(graded, 0.5).success
  assert not apply_success_threshold(graded, 0.8).success
  assert apply_success_threshold(graded, 0.5).feedback == "test 4 failed"
  own = Verdict(reward=0.9, success=True)  # a custom verifier's own call stands at the default
  assert apply_success_threshold(own, 1.0) is own and not apply_success_threshold(own, 0.95).success
  assert config_lib.base_config().verifier.success_threshold == 1.0


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_success_threshold_is_validated(bad):
  with pytest.raises(config_lib.ConfigError, match=r"config.verifier.success_threshold: must be in \(0, 1\]"):
    config_lib.validate(_tiny(**{"verifier.success_threshold": bad}), num_devices=8)


def test_training_rollouts_use_the_success_threshold_and_evaluation_does_not(tokenizer, monkeypatch):
  c = _tiny(**{"verifier.success_threshold": 0.7})
  run = _fake_run(c, tokenizer, [], monkeypatch)
  examples = _examples([3, 4])
  kwargs = dict(group_size=2, temperature=1.0, max_new_tokens=4)
  successes = lambda groups: [s for g in groups for s in g.successes]
  train = rollouts.sample_and_verify(run, examples, jax.random.key(0), training=True, **kwargs)
  held_out = rollouts.sample_and_verify(run, examples, jax.random.key(0), **kwargs)
  assert all(successes(train)) and not any(successes(held_out))
  c.verifier.success_threshold = 1.0
  assert not any(successes(rollouts.sample_and_verify(run, examples, jax.random.key(0), training=True, **kwargs)))


# ------------------------------------------------------------------------ the authors' aggregation

def test_authors_aggregation_is_verl_token_mean_over_micro_batches_of_one_sequence():
  """verl's dp_actor.update_policy with ppo_micro_batch_size_per_gpu=1 (user.yaml): each
  micro-batch (one sequence) takes agg_loss token-mean with batch_num_tokens = its mask's sum
  clamped at 1 (core_algos.compute_self_distillation_loss), scaled by 1 / gradient_accumulation
  (= the mini-batch's rows). A row masked out whole (no peer, no feedback) adds 0 but counts."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((6, 9))
  m = (np.arange(9)[None] < np.array([9, 2, 0, 5, 7, 1])[:, None]).astype(np.float64)
  m[3] *= 0.0  # distill_mask = 0
  verl = sum((x[i] * m[i]).sum() / max(m[i].sum(), 1.0) * (1.0 / 6) for i in range(6))
  with jax.enable_x64(True):
    got = float(losses.aggregate_loss(jnp.asarray(x), jnp.asarray(m), "seq-mean-token-mean-all-rows"))
    nearest = float(losses.aggregate_loss(jnp.asarray(x), jnp.asarray(m), "seq-mean-token-mean"))
    den = float(losses.agg_denominator("seq-mean-token-mean-all-rows", jnp.asarray(m)))
  np.testing.assert_allclose(got, verl, rtol=1e-12)
  np.testing.assert_allclose(nearest, verl * 6 / 4, rtol=1e-12)  # the existing mode skips the 2 empty rows
  assert den == 6.0
  assert "seq-mean-token-mean-all-rows" in losses.LOSS_AGGREGATIONS


# ------------------------------------------------------------------------ MOPD + external teacher

@pytest.mark.slow
def test_mopd_with_an_external_teacher_trains_the_student_and_keeps_the_teacher_frozen(tmp_path):
  """method=mopd with teacher.mode=external (configs/qwen3_14b_to_4b.py, at tiny size): peer
  contexts are built, the external model scores them, the student moves, the teacher never does."""
  c = _tiny(**{"teacher.mode": "external", "teacher.external_preset": "tiny-qwen3", "train.steps": 2,
               "logging.dir": str(tmp_path)})
  config_lib.validate(c, num_devices=8)
  run = trainer.setup(c)
  teacher0 = jax.tree.map(np.asarray, run.teacher.params)
  student0 = jax.tree.map(np.asarray, run.state.params)
  assert jax.tree.structure(teacher0) != jax.tree.structure(student0)  # another model (qwen3: qk-norm)
  records = [trainer.run_one_step(run) for _ in range(2)]
  for r in records:
    assert np.isfinite(r["loss"]) and r["update_applied"] == 1.0
    assert r["peers/masked_frac"] < 1.0 and r["peers/sections_mean"] > 0  # the teacher saw peer contexts
  for a, b in zip(jax.tree.leaves(teacher0), jax.tree.leaves(run.teacher.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(student0), jax.tree.leaves(run.state.params)))
