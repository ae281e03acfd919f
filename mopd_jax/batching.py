"""Host-side assembly of fixed-shape training batches.

Every student row is `[left-padded prompt | right-padded response]`. Prompt and response
lengths are rounded up to buckets so the train step compiles once per (bucket, bucket) pair.

The teacher reads each response after its peer-context prompt. Rollouts of a group share
few distinct contexts (every failure of a 2S1F group sees the same successes), so the batch
carries each group's *distinct* contexts once, in a table of K slots per group
(`teacher_contexts`, left-padded), and each row's slot (`teacher_context_index`). The train
step either encodes each context once (`models.shared_prefix`) or rebuilds the per-row
`[context | response]` rows (`teacher_rows`), at the same values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.models.shared_prefix import within_groups

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
  teacher_contexts: jax.Array  # [P * K, Pt] int32: group p's distinct teacher prompts in slots p*K ..
  teacher_context_segments: jax.Array  # [P * K, Pt] int32, 0 = padding
  teacher_context_index: jax.Array  # [N] int32 in [0, K): the row's slot within its group's K
  response_tokens: jax.Array  # [N, R] int32, the targets
  response_mask: jax.Array  # [N, R] float32
  distill_mask: jax.Array  # [N] float32: 0 when the teacher context added nothing
  sampler_logprobs: jax.Array  # [N, R] float32, log p_old of each response token
  step_ids: jax.Array  # [N, R] int32, reasoning-step index of each token (step-level loss)
  rewards: jax.Array  # [N] float32
  success: jax.Array  # [N] float32
  group_ids: jax.Array  # [N] int32, index of the prompt within the batch
  # G: rows are P groups of G consecutive rows (static: it fixes the context table's layout).
  group_size: int = flax.struct.field(pytree_node=False)

  @property
  def student_prompt_len(self) -> int:
    return self.student_tokens.shape[1] - self.response_tokens.shape[1]

  @property
  def teacher_prompt_len(self) -> int:
    return self.teacher_contexts.shape[1]

  @property
  def context_slots(self) -> int:
    """K: teacher-context slots per group."""
    return self.teacher_contexts.shape[0] * self.group_size // self.response_tokens.shape[0]


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


def groups_of(group_ids: Sequence[int]) -> list[range]:
  """Row ranges of the consecutive runs of equal group ids; every group must have the same size."""
  starts = [i for i in range(len(group_ids)) if i == 0 or group_ids[i] != group_ids[i - 1]]
  groups = [range(a, b) for a, b in zip(starts, starts[1:] + [len(group_ids)])]
  sizes = sorted({len(g) for g in groups})
  if len(sizes) > 1:
    raise ValueError(f"RolloutRows.group_ids: groups must be consecutive rows of one size, got sizes {sizes}")
  if len({group_ids[g[0]] for g in groups}) != len(groups):
    raise ValueError("RolloutRows.group_ids: a group's rows must be consecutive")
  return groups


def distinct_contexts(rows: "RolloutRows") -> int:
  """The most distinct teacher prompts any group of `rows` has."""
  return max(len({tuple(rows.teacher_prompts[i]) for i in g}) for g in groups_of(rows.group_ids))


def context_slot_multiple(prompts_per_micro_batch: int, batch_shards: int) -> int:
  """The K (context slots per group) must be a multiple of this so that each micro-batch's
  context table (prompts x K rows) divides over the batch shards as its rows do."""
  return batch_shards // math.gcd(batch_shards, prompts_per_micro_batch)


def context_slots(needed: int, group_size: int, multiple: int = 1) -> int:
  """K for a batch whose most varied group has `needed` distinct contexts: rounded up to
  `multiple`, at most the group size. Not rounded to a power of two: 2S1F groups of 8 have 4-7
  distinct contexts (the failure peer is drawn per rollout), and 8 slots for 5 would save nothing.
  Each K is one more compilation of the step; across a batch of many groups K rarely changes."""
  if group_size % multiple:
    raise ValueError(f"context slots: group size {group_size} is not a multiple of {multiple}")
  return min(-(-needed // multiple) * multiple, group_size)


@dataclasses.dataclass(frozen=True)
class ContextTable:
  """Each group's distinct teacher prompts in K slots (unused slots hold one pad token) and
  the slot of every row."""

  contexts: list[Sequence[int]]  # [P * K]
  index: np.ndarray  # [N] int32 in [0, K)
  slots: int  # K
  group_size: int  # G


def context_table(rows: "RolloutRows", pad_id: int, multiple: int = 1, at_least: int = 0) -> ContextTable:
  groups = groups_of(rows.group_ids)
  k = context_slots(max(distinct_contexts(rows), at_least), len(groups[0]), multiple)
  contexts, index = [], np.zeros((len(rows.group_ids),), np.int32)
  for g in groups:
    slot_of: dict[tuple[int, ...], int] = {}
    for i in g:
      index[i] = slot_of.setdefault(tuple(rows.teacher_prompts[i]), len(slot_of))
    # A one-token placeholder, not an empty row: every prefix row then has a token to attend to.
    contexts += [list(c) for c in slot_of] + [[pad_id]] * (k - len(slot_of))
  return ContextTable(contexts=contexts, index=index, slots=k, group_size=len(groups[0]))


def build_train_batch(
    rows: RolloutRows,
    *,
    pad_id: int,
    prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
    response_buckets: Sequence[int] = DEFAULT_BUCKETS,
    teacher_prompt_buckets: Optional[Sequence[int]] = None,
    at_least: tuple[int, int, int, int] = (0, 0, 0, 0),
    context_slot_multiple: int = 1,
) -> TrainBatch:
  """Pads `rows` to buckets. `at_least` = (student prompt, teacher prompt, response lengths,
  distinct contexts per group) the shapes must also fit: multi-process runs pass the global
  maxima (`local_max_lengths` of every process) so that every process picks the same shapes.
  `context_slot_multiple`: see `context_slot_multiple`."""
  n = len(rows.responses)
  for field in dataclasses.fields(rows):
    value = getattr(rows, field.name)
    if value is not None and len(value) != n:
      raise ValueError(f"RolloutRows.{field.name} has {len(value)} entries, expected {n}")
  if any(len(p) == 0 for p in rows.student_prompts):
    raise ValueError("RolloutRows.student_prompts: every prompt needs at least one token")
  if any(len(p) == 0 for p in rows.teacher_prompts):
    raise ValueError("RolloutRows.teacher_prompts: every teacher prompt needs at least one token")
  ps_len, pt_len, r_len, _ = local_max_lengths(rows)
  ps = bucket_for(max(ps_len, at_least[0]), prompt_buckets, "student prompt")
  pt = bucket_for(max(pt_len, at_least[1]), teacher_prompt_buckets or prompt_buckets, "teacher prompt")
  r = bucket_for(max(r_len, at_least[2]), response_buckets, "response")
  table = context_table(rows, pad_id, context_slot_multiple, at_least[3])
  response = _right_pad(rows.responses, r, pad_id, np.int32)
  mask = _right_pad([[1.0] * len(x) for x in rows.responses], r, 0.0, np.float32)
  s_tok, s_seg = _left_pad(rows.student_prompts, ps, pad_id)
  t_tok, t_seg = _left_pad(table.contexts, pt, pad_id)
  step_ids = rows.step_ids if rows.step_ids is not None else [[0] * len(x) for x in rows.responses]
  return TrainBatch(
      student_tokens=np.concatenate([s_tok, response], 1),
      student_segments=np.concatenate([s_seg, mask.astype(np.int32)], 1),
      teacher_contexts=t_tok,
      teacher_context_segments=t_seg,
      teacher_context_index=table.index,
      response_tokens=response,
      response_mask=mask,
      distill_mask=np.asarray(rows.distill_mask, np.float32),
      sampler_logprobs=_right_pad(rows.sampler_logprobs, r, 0.0, np.float32),
      step_ids=_right_pad(step_ids, r, 0, np.int32),
      rewards=np.asarray(rows.rewards, np.float32),
      success=np.asarray(rows.success, np.float32),
      group_ids=np.asarray(rows.group_ids, np.int32),
      group_size=table.group_size,
  )


def local_max_lengths(rows: RolloutRows) -> tuple[int, int, int, int]:
  """(student prompt, teacher prompt, response) lengths and distinct contexts per group: what
  `build_train_batch`'s shapes must fit (`at_least`)."""
  return (max(map(len, rows.student_prompts)), max(map(len, rows.teacher_prompts)),
          max(1, max(map(len, rows.responses))), distinct_contexts(rows))


def teacher_rows(batch: TrainBatch) -> tuple[jax.Array, jax.Array]:
  """Inside jit: every row's own `[teacher context | response]` tokens and segments ([N, Pt + R]),
  the rows a per-row teacher forward reads."""
  index, g = batch.teacher_context_index, batch.group_size
  tokens = within_groups(batch.teacher_contexts, index, g)
  segments = within_groups(batch.teacher_context_segments, index, g)
  return (jnp.concatenate([tokens, batch.response_tokens], axis=1),
          jnp.concatenate([segments, batch.response_mask.astype(segments.dtype)], axis=1))


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
