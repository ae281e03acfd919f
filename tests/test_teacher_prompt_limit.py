"""The teacher-prompt limit bounds the chat-templated prompt, so a filled context fits its bucket.

`max_teacher_prompt_len` used to count only message contents; truncation filled it exactly and
the chat template's own tokens (system prompt, role markers, the assistant opening) pushed the
prompt past the largest bucket mid-run. These tests drive real long peers through the trainer's
own path (`rollouts.with_teacher_contexts` then `trainer.build_batch`) with SmolLM2's real tokenizer.
"""

import types

import numpy as np
import pytest

from configs import default as default_config
from config_tools import override
import fakes
from mopd_jax import config_lib, peers, rollouts, trainer
from mopd_jax.types import Example, Message, Verdict

BUCKET = 512
GROUP = 4


@pytest.fixture(scope="module")
def tokenizer():
  return fakes.smollm2_tokenizer()


def long_text(seed: int, words: int) -> str:
  rng = np.random.default_rng(seed)
  vocab = ["carry", "the", "digit", "sum", "of", "tens", "units", "so", "we", "add", "then", "check", "17", "+", "=",
           "answer", "because", "first", "next", "total"]
  return " ".join(rng.choice(vocab, size=words))


def group_of_long_peers(tokenizer, *, system: bool) -> rollouts.RolloutGroup:
  """One prompt, G rollouts of ~600 tokens each: two successes and two failures."""
  prompt = ((Message("system", "You are a careful tutor."),) if system else ()) + (
      Message("user", "What is 17 + 25? Show your work."),)
  example = Example(prompt=prompt, reference="42", verifier="math")
  texts = [long_text(i, 500) for i in range(GROUP)]
  verdicts = [Verdict(success=i < 2, reward=float(i < 2), feedback="" if i < 2 else "wrong") for i in range(GROUP)]
  responses = [tokenizer.encode(t)[:60] for t in texts]  # what the student is trained on (any length)
  return rollouts.group_of(
      example, prompt, rollouts.chat_prompt_tokens(tokenizer, prompt, False), responses,
      [[-1.0] * len(r) for r in responses], texts, verdicts, ["stop"] * GROUP)


def with_contexts(run, groups):
  return rollouts.with_teacher_contexts(groups, run.peer_config, run.tokenizer, enable_thinking=False)


def paper_like_run(tokenizer, truncation="right"):
  c = default_config.get_config()
  with c.unlocked():
    c.data.prompt_buckets = (64, 128)
    c.data.response_buckets = (64,)
    c.data.teacher_prompt_buckets = (256, BUCKET)
    # As configs/paper_common.py does: the limit is exactly the largest teacher bucket.
    c.mopd.overrides = {"max_teacher_prompt_len": BUCKET, "truncation": truncation, "include_feedback": True}
  config_lib.validate(c)
  return types.SimpleNamespace(config=c, tokenizer=tokenizer, peer_config=config_lib.peer_config(c), mesh=None)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("truncation", ["right", "left"])
def test_contexts_filled_to_the_limit_fit_the_largest_teacher_bucket(tokenizer, system, truncation):
  run = paper_like_run(tokenizer, truncation)
  groups = with_contexts(run, [group_of_long_peers(tokenizer, system=system)])
  flat = [c for g in groups for c in g.contexts]
  teacher_prompts = [p for g in groups for p in g.teacher_prompt_tokens]
  assert all(c.truncated for c in flat), "the peers are long enough that every context is truncated"
  lengths = [len(p) for p in teacher_prompts]
  assert max(lengths) <= BUCKET
  # Filled, not starved: truncation keeps all but a few tokens of the budget (binary search over characters).
  assert min(lengths) >= BUCKET - 8, lengths
  # The recorded length is the templated one, the number the bucket holds.
  assert [c.num_tokens for c in flat] == lengths
  batch = trainer.build_batch(run, groups)  # raised "exceeds the largest bucket" before
  assert batch.teacher_contexts.shape[1] == BUCKET


def test_error_truncation_counts_the_template_tokens(tokenizer):
  run = paper_like_run(tokenizer, truncation="error")
  with pytest.raises(peers.TeacherPromptTooLongError, match=r"tokens > max_teacher_prompt_len=512"):
    with_contexts(run, [group_of_long_peers(tokenizer, system=False)])


@pytest.mark.parametrize("overrides, message", [
    ({"data.teacher_prompt_buckets": (128, 256), "mopd.overrides.max_teacher_prompt_len": 300},
     r"config.mopd.overrides.max_teacher_prompt_len: 300 exceeds the largest teacher prompt bucket 256"),
    ({"data.teacher_prompt_buckets": (32,), "mopd.overrides.max_teacher_prompt_len": 32},
     r"config.data.teacher_prompt_buckets: the largest teacher prompt bucket 32 is smaller than the largest "
     r"student prompt bucket 64"),
    ({"data.teacher_prompt_buckets": ()}, r"config.data.teacher_prompt_buckets: must be a non-empty sequence"),
    ({"data.response_buckets": (64, 0)}, r"config.data.response_buckets: must be a non-empty sequence of positive"),
])
def test_a_limit_or_buckets_that_cannot_hold_the_teacher_prompt_fail_validation(overrides, message):
  c = override(default_config.get_config("tiny"), overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, num_devices=8)


def test_the_paper_configs_limit_fits_their_buckets():
  from configs import qwen3_8b_lcb
  c = qwen3_8b_lcb.get_config()
  assert config_lib.peer_config(c).max_teacher_prompt_len <= max(c.data.teacher_prompt_buckets)
