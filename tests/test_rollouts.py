"""One rollout group from sampler to batch: row order, the JSONL record, the one evaluation loop,
and one teacher-context path for training and the teacher-signal analysis."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from configs import default as default_config
from configs import teacher_signal as teacher_signal_config
import fakes
from mopd_jax import peers, rollouts, sharding, trainer
from mopd_jax.analysis import teacher_signal
from mopd_jax.sampling import FinishReason
from mopd_jax.types import Example, Message, Verdict

G = 3


@pytest.fixture(scope="module")
def tokenizer():
  return fakes.smollm2_tokenizer()


def _tiny(**overrides):
  c = default_config.get_config("tiny")
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _examples(n: int) -> list[Example]:
  return [Example(prompt=(Message("user", f"What is {i} + {i}?"),), reference=str(2 * i), verifier="math",
                  example_id=f"q{i}") for i in range(n)]


def _flat_result(prompts, num_samples: int, vocab: int = 50):
  """A sampler result whose every row is distinct: row r's tokens and log-probs name r."""
  rows = len(prompts) * num_samples
  lengths = np.array([1 + r % 4 for r in range(rows)])
  tokens = np.array([[(r * 7 + t) % vocab + 1 for t in range(6)] for r in range(rows)], np.int32)
  return types.SimpleNamespace(
      num_rows=rows, tokens=tokens, lengths=lengths, texts=tuple(f"row {r}: {r % 2 == 0}" for r in range(rows)),
      scaled_logprobs=-np.arange(rows * 6, dtype=np.float32).reshape(rows, 6) / 10,
      finish_reasons=tuple(FinishReason.LENGTH if r % 3 == 0 else FinishReason.STOP for r in range(rows)))


class _EvenRowsSucceed:
  def verify(self, examples, completions, deadline_s=None):
    return [Verdict(1.0, True) if text.endswith("True") else Verdict(0.0, False, feedback=f"wrong: {text}")
            for text in completions]


def _fake_run(config, tokenizer, calls, monkeypatch):
  def sample(model, prompts, *, num_samples, rng, sampling_params, mesh=None, decode_fn=None, prompt_ids=None):
    calls.append(types.SimpleNamespace(prompts=list(prompts), rng=rng, prompt_ids=list(prompt_ids)))
    return _flat_result(prompts, num_samples)

  return fakes.fake_sampler_run(config, tokenizer, sample, _EvenRowsSucceed(), monkeypatch)


# ----------------------------------------------------------------------------- sampler -> batch


def test_a_group_survives_sampler_to_batch_in_the_sampler_row_order(tokenizer, monkeypatch):
  c = _tiny(**{"loss.step_level": True})
  run = _fake_run(c, tokenizer, [], monkeypatch)
  examples = _examples(2)
  groups = rollouts.sample_and_verify(run, examples, jax.random.key(0), group_size=G, temperature=1.0,
                                      max_new_tokens=6, first_prompt_id=4, training=True)
  assert [g.example_id for g in groups] == ["q0", "q1"] and all(len(g) == G for g in groups)
  groups = rollouts.with_teacher_contexts(groups, run.peer_config, tokenizer, enable_thinking=False, step=2,
                                          first_group_index=4)
  batch = trainer.build_batch(run, groups)

  # The flattening the trainer used before the record: row r of the sampler is row r of the
  # batch, from prompt r // G.
  flat = _flat_result(examples, G)
  n = flat.num_rows
  prompts = [rollouts.chat_prompt_tokens(tokenizer, peers.student_prompt(e.prompt, run.peer_config), False)
             for e in examples]
  old_groups = [peers.Group(prompt=peers.student_prompt(e.prompt, run.peer_config),
                            responses=flat.texts[p * G:(p + 1) * G],
                            verdicts=run.verifier_pool.verify([e] * G, flat.texts[p * G:(p + 1) * G]))
                for p, e in enumerate(examples)]
  contexts = peers.build_teacher_contexts(
      old_groups, run.peer_config, step=2, group_indices=[4, 5],
      count_tokens=lambda text: len(tokenizer.encode(text)),
      count_prompt_tokens=lambda m: len(rollouts.chat_prompt_tokens(tokenizer, m, False)))
  flat_ctx = [ctx for row in contexts for ctx in row]
  responses = [flat.tokens[r, :flat.lengths[r]].tolist() for r in range(n)]
  verdicts = run.verifier_pool.verify([examples[r // G] for r in range(n)], flat.texts)
  old = trainer.batching.build_train_batch(
      trainer.batching.RolloutRows(
          student_prompts=[prompts[r // G] for r in range(n)],
          teacher_prompts=[rollouts.chat_prompt_tokens(tokenizer, ctx.messages, False) for ctx in flat_ctx],
          responses=responses,
          sampler_logprobs=[flat.scaled_logprobs[r, :flat.lengths[r]].tolist() for r in range(n)],
          distill_mask=[ctx.distill_mask for ctx in flat_ctx],
          rewards=[v.reward for v in verdicts], success=[v.success for v in verdicts],
          group_ids=[r // G for r in range(n)],
          step_ids=[trainer.batching.step_ids_from_text_offsets([tokenizer.decode([t]) for t in resp])
                    for resp in responses]),
      pad_id=tokenizer.pad_id, prompt_buckets=c.data.prompt_buckets, response_buckets=c.data.response_buckets,
      teacher_prompt_buckets=c.data.teacher_prompt_buckets)
  for field in dataclasses.fields(old):
    np.testing.assert_array_equal(getattr(batch, field.name), getattr(old, field.name), err_msg=field.name)
  assert [ctx for g in groups for ctx in g.contexts] == flat_ctx


def test_batch_rows_need_teacher_contexts(tokenizer, monkeypatch):
  run = _fake_run(_tiny(), tokenizer, [], monkeypatch)
  groups = rollouts.sample_and_verify(run, _examples(1), jax.random.key(0), group_size=G, temperature=1.0,
                                      max_new_tokens=6)
  with pytest.raises(ValueError, match=r"groups \['q0'\] lack sampler tokens or teacher contexts"):
    rollouts.batch_rows(groups)


# ----------------------------------------------------------------------------- the JSONL record


def test_the_record_round_trips_through_the_v1_dump(tokenizer, monkeypatch, tmp_path):
  run = _fake_run(_tiny(), tokenizer, [], monkeypatch)
  sampled = rollouts.sample_and_verify(run, _examples(2), jax.random.key(0), group_size=G, temperature=1.0,
                                       max_new_tokens=6)
  sampled = rollouts.with_teacher_contexts(sampled, run.peer_config, tokenizer, enable_thinking=False)
  path = rollouts.write_rollouts(tmp_path / "r.jsonl", sampled)
  # The dump keeps the v1 fields, as written before the record held tokens, log-probs and contexts.
  first = json.loads(path.read_text().splitlines()[0])
  g = sampled[0]
  assert first == {
      "schema": "mopd_jax.rollouts/v1", "example_id": "q0", "prompt": [{"role": "user", "content": "What is 0 + 0?"}],
      "responses": list(g.responses), "rewards": list(g.rewards), "successes": list(g.successes),
      "response_tokens": [list(t) for t in g.response_tokens], "feedback": list(g.feedback),
      "finish_reasons": ["length", "stop", "stop"], "reference": "0"}
  in_memory = dict(prompt_tokens=(), response_logprobs=None, contexts=(), teacher_prompt_tokens=())
  assert rollouts.read_rollouts(path) == [dataclasses.replace(g, **in_memory) for g in sampled]
  assert rollouts.read_rollouts(rollouts.write_rollouts(tmp_path / "again.jsonl", rollouts.read_rollouts(path))) \
      == rollouts.read_rollouts(path)


def test_the_record_checks_its_lengths():
  group = rollouts.RolloutGroup("x", (Message("user", "q"),), ("a", "b"), (1.0, 0.0), (True, False))
  with pytest.raises(ValueError, match="1 response_logprobs for 2 responses"):
    dataclasses.replace(group, response_logprobs=((-1.0,),))
  with pytest.raises(ValueError, match="1 contexts for 2 responses"):
    dataclasses.replace(group, contexts=(None,))


# ----------------------------------------------------------------------------- the evaluation loop


@pytest.mark.parametrize("fold_in_start", [False, True])
def test_the_evaluation_loop_keeps_each_callers_random_streams(tokenizer, monkeypatch, fold_in_start):
  """trainer.evaluate: one key, prompts numbered globally; evaluate / the analysis: the key
  folded with the chunk's start, prompts numbered from 0 in each call."""
  calls = []
  run = _fake_run(_tiny(), tokenizer, calls, monkeypatch)
  run.sample_mesh = sharding.make_mesh(sharding.MeshConfig(-1, 1, 1))  # 8 shards: 3 prompts pad to 8
  rng = jax.random.key(7)
  groups = rollouts.sample_groups(run, _examples(5), rng, num_samples=2, temperature=1.0, max_new_tokens=6,
                                  batch_prompts=3, fold_in_start=fold_in_start)
  assert [g.example_id for g in groups] == [f"q{i}" for i in range(5)]
  assert [len(call.prompts) for call in calls] == [8, 8]
  for call, start in zip(calls, (0, 3)):
    key = jax.random.fold_in(rng, start) if fold_in_start else rng
    np.testing.assert_array_equal(jax.random.key_data(call.rng), jax.random.key_data(key))
    first = 0 if fold_in_start else start
    assert call.prompt_ids == list(range(first, first + 8))


def test_trainer_evaluate_is_the_evaluation_loop(tokenizer, monkeypatch):
  calls = []
  run = _fake_run(_tiny(**{"eval.num_samples": 2, "eval.batch_prompts": 2}), tokenizer, calls, monkeypatch)
  result = trainer.evaluate(run, _examples(3), jax.random.key(3))
  assert [call.prompt_ids for call in calls] == [[0, 1], [2]]
  assert result.per_item_success == [[True, False]] * 3 and result.mean_at_k == 0.5 and result.pass_at_k == 1.0


# ----------------------------------------------------------------------------- one context path


def _long_groups(tokenizer) -> list[rollouts.RolloutGroup]:
  words = "carry the digit then add the tens and check the units again".split()
  out = []
  for p in range(2):
    texts = tuple(" ".join(words[(j + k) % len(words)] for k in range(120 + 10 * j)) + f" answer {j}"
                  for j in range(4))
    successes = (True, False, True, False) if p == 0 else (False, True, True, False)
    out.append(rollouts.RolloutGroup(
        example_id=f"q{p}", prompt=(Message("system", "Be brief."), Message("user", f"What is {p} + 17?")),
        responses=texts, rewards=tuple(float(s) for s in successes), successes=successes,
        feedback=tuple("" if s else "wrong" for s in successes)))
  return out


@pytest.mark.parametrize("variant", ["2s1f", "solution", "random_peer", "unrelated_prompt"])
def test_analysis_and_training_build_the_same_teacher_contexts(tokenizer, variant):
  config = teacher_signal_config.get_config("tiny")
  config.analysis.max_teacher_prompt_len = 150  # the peers must be cut to fit
  options = teacher_signal.variant_options(config, tokenizer)
  groups = _long_groups(tokenizer)
  analysis = teacher_signal.build_variant_contexts(groups, (variant,), options)[variant]
  training = rollouts.with_teacher_contexts(groups, teacher_signal.variant_peer_config(variant, options), tokenizer,
                                            enable_thinking=config.sampling.enable_thinking)
  assert analysis == [list(g.contexts) for g in training]
  flat = [ctx for g in training for ctx in g.contexts]
  assert any(ctx.truncated for ctx in flat)
  # The limit bounds the templated prompt, as the teacher's bucket holds it.
  lengths = [len(p) for g in training for p in g.teacher_prompt_tokens]
  assert [ctx.num_tokens for ctx in flat] == lengths and max(lengths) <= 150


def test_analysis_only_variants_measure_the_templated_prompt(tokenizer):
  config = teacher_signal_config.get_config("tiny")
  config.analysis.max_teacher_prompt_len = 300
  options = teacher_signal.variant_options(config, tokenizer)
  contexts = teacher_signal.build_variant_contexts(_long_groups(tokenizer), ("all_solutions",), options)
  flat = [ctx for row in contexts["all_solutions"] for ctx in row]
  lengths = [len(rollouts.chat_prompt_tokens(tokenizer, ctx.messages, config.sampling.enable_thinking))
             for ctx in flat]
  assert [ctx.num_tokens for ctx in flat] == lengths and max(lengths) <= 300 and any(c.truncated for c in flat)


def test_the_run_log_shows_the_first_rollouts_group_by_group(tokenizer, monkeypatch, tmp_path):
  from mopd_jax.logging_lib import MetricsLogger
  run = _fake_run(_tiny(), tokenizer, [], monkeypatch)
  groups = rollouts.sample_and_verify(run, _examples(2), jax.random.key(0), group_size=G, temperature=1.0,
                                      max_new_tokens=6)
  groups = rollouts.with_teacher_contexts(groups, run.peer_config, tokenizer, enable_thinking=False)
  logger = MetricsLogger(str(tmp_path), progress=False)
  logger.write_rollouts(5, groups, count=4)
  logger.close()
  text = (tmp_path / "rollouts.md").read_text()
  headings = [line.split(":")[0] for line in text.splitlines() if line.startswith("### rollout")]
  assert headings == ["### rollout 0 (prompt 0)", "### rollout 1 (prompt 0)", "### rollout 2 (prompt 0)",
                      "### rollout 3 (prompt 1)"]
  assert "row 3: False" in text and "**feedback**: wrong: row 1: False" in text
