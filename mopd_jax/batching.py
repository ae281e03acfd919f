"""Host-side assembly of fixed-shape training batches.

Every row is `[left-padded prompt | right-padded response]`. Prompt and response lengths
are rounded up to buckets so the train step compiles once per (bucket, bucket) pair. The
student row carries the plain prompt; the teacher row carries the peer-context prompt
followed by the very same response tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import numpy as np

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bucket_for(length: int, buckets: Sequence[int], what: str) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"{what}: length {length} exceeds the largest bucket {max(buckets)}")


@flax.struct.dataclass
class TrainBatch:
  """One step's rows. N = prompts x G rollouts; Ps/Pt prompt buckets, R response bucket."""

  student_tokens: jax.Array  # [N, Ps + R] int32
  student_segments: jax.Array  # [N, Ps + R] int32, 0 = padding
  teacher_tokens: jax.Array  # [N, Pt + R] int32
  teacher_segments: jax.Array  # [N, Pt + R] int32
  response_tokens: jax.Array  # [N, R] int32, the targets
  response_mask: jax.Array  # [N, R] float32
  distill_mask: jax.Array  # [N] float32: 0 when the teacher context added nothing
  sampler_logprobs: jax.Array  # [N, R] float32, log p_old of each response token
  step_ids: jax.Array  # [N, R] int32, reasoning-step index of each token (step-level loss)
  rewards: jax.Array  # [N] float32
  success: jax.Array  # [N] float32
  group_ids: jax.Array  # [N] int32, index of the prompt within the batch

  @property
  def student_prompt_len(self) -> int:
    return self.student_tokens.shape[1] - self.response_tokens.shape[1]

  @property
  def teacher_prompt_len(self) -> int:
    return self.teacher_tokens.shape[1] - self.response_tokens.shape[1]


@dataclasses.dataclass(frozen=True)
class RolloutRows:
  """Host lists, one entry per rollout, before padding."""

  student_prompts: Sequence[Sequence[int]]
  teacher_prompts: Sequence[Sequence[int]]
  responses: Sequence[Sequence[int]]
  sampler_logprobs: Sequence[Sequence[float]]
  distill_mask: Sequence[float]
  rewards: Sequence[float]
  success: Sequence[bool]
  group_ids: Sequence[int]
  step_ids: Optional[Sequence[Sequence[int]]] = None


def _left_pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  segments = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, width - len(s):] = s
      segments[i, width - len(s):] = 1
  return tokens, segments


def _right_pad(seqs: Sequence[Sequence[float]], width: int, fill, dtype) -> np.ndarray:
  out = np.full((len(seqs), width), fill, dtype)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


def build_train_batch(
    rows: RolloutRows,
    *,
    pad_id: int,
    prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
    response_buckets: Sequence[int] = DEFAULT_BUCKETS,
    teacher_prompt_buckets: Optional[Sequence[int]] = None,
    at_least: tuple[int, int, int] = (0, 0, 0),
) -> TrainBatch:
  """Pads `rows` to buckets. `at_least` = (student prompt, teacher prompt, response) lengths
  the buckets must also fit: multi-process runs pass the global maxima so that every process
  picks the same shapes."""
  n = len(rows.responses)
  for field in dataclasses.fields(rows):
    value = getattr(rows, field.name)
    if value is not None and len(value) != n:
      raise ValueError(f"RolloutRows.{field.name} has {len(value)} entries, expected {n}")
  if any(len(p) == 0 for p in rows.student_prompts):
    raise ValueError("RolloutRows.student_prompts: every prompt needs at least one token")
  ps_len, pt_len, r_len = local_max_lengths(rows)
  ps = bucket_for(max(ps_len, at_least[0]), prompt_buckets, "student prompt")
  pt = bucket_for(max(pt_len, at_least[1]), teacher_prompt_buckets or prompt_buckets, "teacher prompt")
  r = bucket_for(max(r_len, at_least[2]), response_buckets, "response")
  response = _right_pad(rows.responses, r, pad_id, np.int32)
  mask = _right_pad([[1.0] * len(x) for x in rows.responses], r, 0.0, np.float32)
  s_tok, s_seg = _left_pad(rows.student_prompts, ps, pad_id)
  t_tok, t_seg = _left_pad(rows.teacher_prompts, pt, pad_id)
  step_ids = rows.step_ids if rows.step_ids is not None else [[0] * len(x) for x in rows.responses]
  return TrainBatch(
      student_tokens=np.concatenate([s_tok, response], 1),
      student_segments=np.concatenate([s_seg, mask.astype(np.int32)], 1),
      teacher_tokens=np.concatenate([t_tok, response], 1),
      teacher_segments=np.concatenate([t_seg, mask.astype(np.int32)], 1),
      response_tokens=response,
      response_mask=mask,
      distill_mask=np.asarray(rows.distill_mask, np.float32),
      sampler_logprobs=_right_pad(rows.sampler_logprobs, r, 0.0, np.float32),
      step_ids=_right_pad(step_ids, r, 0, np.int32),
      rewards=np.asarray(rows.rewards, np.float32),
      success=np.asarray(rows.success, np.float32),
      group_ids=np.asarray(rows.group_ids, np.int32),
  )


def local_max_lengths(rows: RolloutRows) -> tuple[int, int, int]:
  return (max(map(len, rows.student_prompts)), max(map(len, rows.teacher_prompts)),
          max(1, max(map(len, rows.responses))))


def step_ids_from_text_offsets(token_texts: Sequence[str], separator: str = "\n\n") -> list[int]:
  """Step index per token: a new step starts after a token whose text ends a separator."""
  ids, step, text = [], 0, ""
  for piece in token_texts:
    ids.append(step)
    text += piece
    if separator in text:
      step += 1
      text = text[text.rindex(separator) + len(separator):]
  return ids
