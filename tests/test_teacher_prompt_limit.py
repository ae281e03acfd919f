"""The teacher-prompt limit bounds the chat-templated prompt, so a filled context fits its bucket.

`max_teacher_prompt_len` used to count only message contents; truncation filled it exactly and
the chat template's own tokens (system prompt, role markers, the assistant opening) pushed the
prompt past the largest bucket mid-run. These tests drive real long peers through the trainer's
own path (`trainer.teacher_rows` then `trainer.build_batch`) with SmolLM2's real tokenizer.
"""

import types

import numpy as np
import pytest

from configs import default as default_config
from config_tools import override
from mopd_jax import config_lib, peers, trainer, weights
from mopd_jax.types import Example, Message, Verdict

BUCKET = 512
GROUP = 4


@pytest.fixture(scope="module")
def tokenizer():
  try:
    return weights.load_gguf_tokenizer(weights.smollm2_gguf_path())
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 GGUF absent: {e}")


def long_text(seed: int, words: int) -> str:
  rng = np.random.default_rng(seed)
  vocab = ["carry", "the", "digit", "sum", "of", "tens", "units", "so", "we", "add", "then", "check", "17", "+", "=",
           "answer", "because", "first", "next", "total"]
  return " ".join(rng.choice(vocab, size=words))


def rollouts_of_long_peers(tokenizer, *, system: bool) -> trainer.Rollouts:
  """One prompt, G rollouts of ~600 tokens each: two successes and two failures."""
  prompt = ((Message("system", "You are a careful tutor."),) if system else ()) + (
      Message("user", "What is 17 + 25? Show your work."),)
  example = Example(prompt=prompt, reference="42", verifier="math")
  texts = [long_text(i, 500) for i in range(GROUP)]
  verdicts = [Verdict(success=i < 2, reward=float(i < 2), feedback="" if i < 2 else "wrong") for i in range(GROUP)]
  responses = [tokenizer.encode(t)[:60] for t in texts]  # what the student is trained on (any length)
  return trainer.Rollouts(
      examples=[example], prompt_tokens=[trainer.chat_prompt_tokens(tokenizer, prompt, False)],
      response_tokens=responses, response_logprobs=[[-1.0] * len(r) for r in responses], texts=texts,
      verdicts=verdicts, finish_reasons=["stop"] * GROUP, group_size=GROUP)


def paper_like_run(tokenizer, truncation="right"):
  c = default_config.get_config()
  with c.unlocked():
    c.data.prompt_buckets = (64, 128)
    c.data.response_buckets = (64,)
    c.data.teacher_prompt_buckets = (256, BUCKET)
    # As configs/paper_common.py does: the limit is exactly the largest teacher bucket.
    c.mopd.overrides = {"max_teacher_prompt_len": BUCKET, "truncation": truncation, "include_feedback": True}
  config_lib.validate(c)
  return types.SimpleNamespace(config=c, tokenizer=tokenizer, peer_config=config_lib.peer_config(c))


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("truncation", ["right", "left"])
def test_contexts_filled_to_the_limit_fit_the_largest_teacher_bucket(tokenizer, system, truncation):
  run = paper_like_run(tokenizer, truncation)
  rollouts = rollouts_of_long_peers(tokenizer, system=system)
  contexts, teacher_prompts = trainer.teacher_rows(run, rollouts, step=0, group_offset=0)
  flat = [c for row in contexts for c in row]
  assert all(c.truncated for c in flat), "the peers are long enough that every context is truncated"
  lengths = [len(p) for p in teacher_prompts]
  assert max(lengths) <= BUCKET
  # Filled, not starved: truncation keeps all but a few tokens of the budget (binary search over characters).
  assert min(lengths) >= BUCKET - 8, lengths
  # The recorded length is the templated one, the number the bucket holds.
  assert [c.num_tokens for c in flat] == lengths
  batch = trainer.build_batch(run, rollouts, teacher_prompts, contexts)  # raised "exceeds the largest bucket" before
  assert batch.teacher_tokens.shape == (GROUP, BUCKET + 64)


def test_error_truncation_counts_the_template_tokens(tokenizer):
  run = paper_like_run(tokenizer, truncation="error")
  with pytest.raises(peers.TeacherPromptTooLongError, match=r"tokens > max_teacher_prompt_len=512"):
    trainer.teacher_rows(run, rollouts_of_long_peers(tokenizer, system=False), step=0, group_offset=0)


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
