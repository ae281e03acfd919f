"""A run's prompts from `config.data`: training and held-out examples, overlong prompts dropped.

    train, held_out = load_examples(config)
    train, held_out, stats = filter_prompts(config, tokenizer, peer_config, train, held_out)

Used by the trainer's setup, `mopd_jax.evaluate` and the teacher-signal analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from mopd_jax import config_lib, peers, rollouts
from mopd_jax.tasks import load_task
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.types import Example


def load_examples(config) -> tuple[list[Example], list[Example]]:
  """(train, held-out eval). Procedural tasks use another seed for eval; files hold out a tail."""
  d = config.data
  options = dict(d.options)
  if d.path:
    options.setdefault("path", d.path)
  if d.task in ("reasoning_gym",) or "seed" in options or d.task in ("basic_arithmetic", "chain_sum", "countdown"):
    seed = options.pop("seed", config.seed)
    train = list(load_task(d.task, size=d.train_size, seed=seed, **options))
    # Held-out prompts never seen in training: draw candidates from another seed range and keep
    # the first eval_size that differ from every training prompt (small task spaces overlap).
    seen = {e.prompt for e in train}
    held_out = []
    for e in load_task(d.task, size=10 * d.eval_size, seed=seed + d.eval_seed_offset, **options):
      if e.prompt not in seen:
        seen.add(e.prompt)
        held_out.append(e)
      if len(held_out) == d.eval_size:
        break
    if len(held_out) < d.eval_size:
      raise config_lib.ConfigError(
          f"config.data.eval_size: only {len(held_out)} held-out prompts differ from the {len(train)} training "
          "ones; lower data.eval_size or data.train_size")
    return train, held_out
  examples = list(load_task(d.task, **options))
  if len(examples) <= d.eval_size:
    raise config_lib.ConfigError(
        f"config.data.eval_size: {d.eval_size} held-out examples requested but the task has {len(examples)}")
  split = len(examples) - d.eval_size  # not examples[:-eval_size]: eval_size 0 would empty training
  return examples[:split][:d.train_size], examples[split:]


@dataclasses.dataclass(frozen=True)
class PromptFilter:
  """What the overlong-prompt filter dropped at load time (verl's `filter_overlong_prompts`)."""

  max_prompt_len: int
  train_kept: int
  train_dropped: int
  eval_kept: int
  eval_dropped: int

  def message(self) -> str:
    return (f"prompts over data.max_prompt_len={self.max_prompt_len} tokens filtered out: {self.train_dropped} of "
            f"{self.train_kept + self.train_dropped} training, {self.eval_dropped} of "
            f"{self.eval_kept + self.eval_dropped} eval")


def drop_overlong_prompts(config, tokenizer: Tokenizer, examples: Sequence[Example],
                          peer_config: Optional[peers.PeerConfig], what: str) -> tuple[list[Example], int]:
  """(the examples whose student prompt fits `config_lib.max_prompt_len`, how many were dropped).

  A prompt is measured as the sampler will see it: `rollouts.student_messages` (peer_config:
  training's instruction; None: evaluation's own prompt), chat template, `sampling.enable_thinking`.
  With data.filter_overlong_prompts=False the first longer prompt is an error naming it, here at
  load time rather than mid-run in the sampler. Dropping every prompt is an error too.
  """
  limit = config_lib.max_prompt_len(config)
  kept = []
  for i, e in enumerate(examples):
    n = len(rollouts.chat_prompt_tokens(tokenizer, rollouts.student_messages(e, peer_config),
                                        config.sampling.enable_thinking))
    if n <= limit:
      kept.append(e)
    elif not config.data.filter_overlong_prompts:
      raise config_lib.ConfigError(
          f"config.data.filter_overlong_prompts=False: {what} prompt {i} (example_id {e.example_id!r}) has {n} "
          f"tokens after the chat template, over data.max_prompt_len={limit}; set "
          "data.filter_overlong_prompts=True to drop such prompts, or raise data.max_prompt_len (and "
          "data.prompt_buckets)")
  if examples and not kept:
    raise config_lib.ConfigError(
        f"config.data.max_prompt_len: all {len(examples)} {what} prompts are longer than {limit} tokens after "
        "the chat template; nothing is left to sample")
  return kept, len(examples) - len(kept)


def filter_prompts(config, tokenizer: Tokenizer, peer_config: peers.PeerConfig, train: Sequence[Example],
                   held_out: Sequence[Example]) -> tuple[list[Example], list[Example], PromptFilter]:
  """`drop_overlong_prompts` over the training prompts (as training samples them) and the
  held-out ones (as evaluation does)."""
  train_kept, train_dropped = drop_overlong_prompts(config, tokenizer, train, peer_config, "training")
  eval_kept, eval_dropped = drop_overlong_prompts(config, tokenizer, held_out, None, "eval")
  stats = PromptFilter(max_prompt_len=config_lib.max_prompt_len(config), train_kept=len(train_kept),
                       train_dropped=train_dropped, eval_kept=len(eval_kept), eval_dropped=eval_dropped)
  return train_kept, eval_kept, stats
