"""Teacher-signal analysis: variant contexts, the rollout dump, and an end-to-end tiny run."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from configs import teacher_signal as teacher_signal_config
from mopd_jax import peers
from mopd_jax.analysis import scoring, teacher_signal
from mopd_jax.rollouts import RolloutGroup, read_rollouts, write_rollouts
from mopd_jax.types import Message

PROMPT = (Message("system", "Be brief."), Message("user", "What is 2+2?"))
REWARDS = (0.0, 1.0, 0.0, 1.0, 1.0, 0.5)  # S = {1, 3, 4}, F = {0, 2, 5}; 5 has partial reward


def _rollouts(n_prompts: int = 2) -> list[RolloutGroup]:
  out = []
  for p in range(n_prompts):
    rewards = REWARDS if p == 0 else REWARDS[::-1]
    out.append(RolloutGroup(
        example_id=f"ex{p}", prompt=(PROMPT[0], Message("user", f"What is {p}+2?")),
        responses=tuple(f"p{p}r{j} the answer is {p + 2 if rewards[j] == 1 else j}" for j in range(len(rewards))),
        rewards=rewards, successes=tuple(r == 1.0 for r in rewards),
        feedback=tuple("" if r == 1.0 else "wrong" for r in rewards)))
  return out


def _peer_indices(ctx: peers.TeacherContext) -> list[int]:
  return [ref.index for ref in ctx.peers if ref.group == ctx.group]


def _contexts(variants=teacher_signal.DEFAULT_VARIANTS + ("unrelated_prompt", "top2_reward")):
  return teacher_signal.build_variant_contexts(_rollouts(), variants, teacher_signal.VariantOptions(seed=1))


def test_no_variant_shows_a_response_itself_or_feedback():
  for name, rows in _contexts().items():
    for row in rows:
      for i, ctx in enumerate(row):
        assert i not in _peer_indices(ctx), (name, i)
        assert peers.FEEDBACK not in ctx.kinds, name
        assert "wrong" not in ctx.messages[-1].content, name


def test_variant_contents_on_a_mixed_group():
  c = _contexts()
  first = lambda name: c[name][0]  # prompt 0: S = {1, 3, 4}, F = {0, 2, 5}
  assert all(ctx.messages == _rollouts()[0].prompt and not ctx.sections for ctx in first("base"))
  # solution: the first success other than i.
  assert [_peer_indices(ctx) for ctx in first("solution")] == [[1], [3], [1], [1], [1], [1]]
  # another_solution: the *second* other success only; none left for a success with one other.
  assert [_peer_indices(ctx) for ctx in first("another_solution")] == [[3], [4], [3], [4], [3], [3]]
  assert all(ctx.kinds == (peers.ANOTHER,) for ctx in first("another_solution"))
  for ctx in first("failure"):
    assert ctx.kinds == (peers.FAILURE,) and _peer_indices(ctx)[0] in {0, 2, 5} - {ctx.rollout}
  assert all(ctx.kinds == (peers.PRIMARY, peers.FAILURE) for ctx in first("solution+failure"))
  assert all(ctx.kinds == (peers.PRIMARY, peers.ANOTHER, peers.FAILURE) for ctx in first("2s1f"))
  assert [_peer_indices(ctx) for ctx in first("all_solutions")] == [
      [1, 3, 4], [3, 4], [1, 3, 4], [1, 4], [1, 3], [1, 3, 4]]
  # top-2 by reward: successes (1, 3, 4 by index), then the partial 0.5 (rollout 5).
  assert [_peer_indices(ctx) for ctx in first("top2_reward")] == [[1, 3], [3, 4], [1, 3], [1, 4], [1, 3], [1, 3]]
  assert all(ctx.kinds == (peers.CONTROL,) * 3 for ctx in first("random_peer"))  # 2S1F has 3 blocks
  for ctx in first("unrelated_prompt"):
    assert ctx.peers and all(ref.group == 1 for ref in ctx.peers)
  labels = peers.PeerLabels()
  text = first("2s1f")[0].messages[-1].content
  assert text.startswith("What is 0+2?") and text.endswith(labels.closing)
  assert labels.primary in text and labels.another in text and labels.failure in text
  assert first("all_solutions")[0].messages[0] == PROMPT[0]  # system message kept


def test_all_solutions_drops_trailing_sections_to_fit():
  options = teacher_signal.VariantOptions(max_teacher_prompt_len=30)
  contexts = teacher_signal.build_variant_contexts(_rollouts(1), ("all_solutions",), options)
  ctx = contexts["all_solutions"][0][0]
  assert ctx.truncated and 0 < len(ctx.sections) < 3 and ctx.num_tokens <= 30


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="2s1f"):
    teacher_signal.get_variant("nope")


def test_rollout_dump_round_trip(tmp_path):
  groups = _rollouts()
  groups[1] = dataclasses.replace(groups[1], response_tokens=tuple((1, 2, j) for j in range(6)),
                                  finish_reasons=("stop",) * 6, reference="2")
  path = write_rollouts(tmp_path / "r.jsonl", groups, extras=[{"note": 1}, {"note": 2}])
  assert read_rollouts(path) == groups
  line = json.loads(path.read_text().splitlines()[0])
  assert line["schema"] == "mopd_jax.rollouts/v1" and line["note"] == 1 and "response_tokens" not in line
  with pytest.raises(ValueError, match="rewards"):
    RolloutGroup("x", PROMPT, ("a", "b"), (1.0,), (True, False))


def _tiny_config(tmp_path, dump: str):
  c = teacher_signal_config.get_config("tiny")
  c.analysis.rollouts_in = dump
  c.analysis.out_dir = str(tmp_path / "out")
  c.analysis.variants = ("base", "solution", "2s1f", "top2_reward")
  c.analysis.context_buckets = (128, 256)
  c.analysis.response_buckets = (16,)
  c.analysis.context_batch = 16
  c.analysis.response_batch = 16
  c.analysis.n_resamples = 50
  return c


def test_end_to_end_on_a_dump_with_a_tiny_model(tmp_path):
  from mopd_jax import evaluate, rollouts

  dump = write_rollouts(tmp_path / "rollouts.jsonl", _rollouts(3))
  config = _tiny_config(tmp_path, str(dump))
  paths, summary = teacher_signal.run_analysis(config)
  names = [c.condition for c in summary.conditions]
  assert names == ["base", "solution", "2s1f", "top2_reward"]
  assert all(c.mixed.n_prompts == 3 for c in summary.conditions)
  for p in (paths.summary_json, paths.summary_markdown, paths.mean_json, paths.mean_markdown, paths.scores,
            *paths.report.bar_plots, paths.report.confound_plot):
    assert os.path.getsize(p) > 0
  assert paths.rollouts is None  # read from a dump: nothing re-written
  text = paths.summary_markdown.read_text()
  assert "## Context coverage" in text and "## Paired differences" in text
  # The pipeline's base scores are the student's log-likelihoods of the responses under the
  # chat-templated plain prompt, at the sampling temperature: recompute them naively.
  graphdef, params, tokenizer, _ = evaluate.load_model(config, config.model.checkpoint)
  rows = [json.loads(line) for line in paths.scores.read_text().splitlines()]
  pairs = [(rollouts.chat_prompt_tokens(tokenizer, g.prompt, False), tokenizer.encode(r))
           for g in _rollouts(3) for r in g.responses]
  full = scoring.score_full((graphdef, params), pairs, params=scoring.ScoringParams(
      context_buckets=(128,), response_buckets=(16,), temperature=config.sampling.temperature))
  got = np.concatenate([row["variants"]["base"]["sum_logprob"] for row in rows])
  np.testing.assert_allclose(got, full.sum_logprob, atol=1e-3, rtol=0)
