"""One rollout group, from sampler to batch: the G sampled responses of one prompt.

    groups = sample_and_verify(run, examples, rng, group_size=G, ...)   # one group per example
    groups = with_teacher_contexts(groups, peer_config, tokenizer, enable_thinking=False, step=s)
    rows = batch_rows(groups)                                           # -> batching.build_train_batch

`RolloutGroup` is the one record: training, the held-out evaluation (`sample_groups`, the one
evaluation loop), `mopd_jax.evaluate` (its items.jsonl) and the teacher-signal analysis (its
frozen rollouts) all pass groups. The sampler's output is flat (`sampling.SampleResult`: row r
belongs to prompt r // G); `_by_prompt` is the one place that splits it into groups, and
`batch_rows` the one place that flattens groups back into batch rows (group by group, rollout
by rollout: the sampler's order).

The JSONL dump (`write_rollouts` / `read_rollouts`, schema "mopd_jax.rollouts/v1") holds the
record's verifier-facing fields; the sampler- and teacher-facing ones (prompt tokens, log-probs,
teacher contexts) live in memory only, so a dump reads back without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import jax

from mopd_jax import batching, peers, sharding
from mopd_jax import sampling as sampling_lib
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.types import Example, Message, Verdict
from mopd_jax.verifiers.base import apply_success_threshold

ROLLOUT_SCHEMA = "mopd_jax.rollouts/v1"

T = TypeVar("T")


class TrainingError(RuntimeError):
  """Something outside the model makes the run's numbers meaningless (it must stop)."""


# ----------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class RolloutGroup:
  """One prompt's G sampled responses with their verdicts and, for training, teacher contexts.

  JSONL dump schema (one JSON object per line, one line per prompt; `write_rollouts` /
  `read_rollouts`):
    schema           "mopd_jax.rollouts/v1"
    example_id       str
    prompt           [{"role": str, "content": str}, ...]   the student's chat messages
    responses        [str] * G      decoded responses, as the verifier saw them
    rewards          [float] * G    verifier rewards in [0, 1]
    successes        [bool] * G     reward >= the task's success threshold
    response_tokens  [[int]] * G    optional: sampled token ids (stop token included); when
                                    absent, consumers re-tokenise `responses`
    feedback         [str] * G      optional: verifier feedback ("" for none)
    finish_reasons   [str] * G      optional: "stop" | "length" | "stop_string"
    reference        str            optional, informational: str(example.reference)
  Extra keys (evaluate's pass@k, diversity) are ignored when reading.

  In memory only (not dumped; empty after `read_rollouts`): `prompt_tokens` (the chat-templated
  `prompt` the sampler was given), `response_logprobs` (the sampler's log-probs at the sampling
  temperature: the importance weight's old policy), and after `with_teacher_contexts` each
  rollout's teacher context and its templated tokens.
  """

  example_id: str
  prompt: tuple[Message, ...]
  responses: tuple[str, ...]
  rewards: tuple[float, ...]
  successes: tuple[bool, ...]
  response_tokens: Optional[tuple[tuple[int, ...], ...]] = None
  feedback: tuple[str, ...] = ()
  finish_reasons: tuple[str, ...] = ()
  reference: str = ""
  prompt_tokens: tuple[int, ...] = ()
  response_logprobs: Optional[tuple[tuple[float, ...], ...]] = None
  contexts: tuple[peers.TeacherContext, ...] = ()
  teacher_prompt_tokens: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    g = len(self.responses)
    if g == 0:
      raise ValueError(f"RolloutGroup {self.example_id!r}: no responses")
    # Empty tuples are absent optional fields; None likewise for the token lists.
    for name in ("rewards", "successes", "response_tokens", "feedback", "finish_reasons", "response_logprobs",
                 "contexts", "teacher_prompt_tokens"):
      value = getattr(self, name)
      if name not in ("rewards", "successes") and not value:
        continue
      if value is not None and len(value) != g:
        raise ValueError(f"RolloutGroup {self.example_id!r}: {len(value)} {name} for {g} responses")

  def __len__(self) -> int:
    return len(self.responses)

  def verdicts(self) -> tuple[Verdict, ...]:
    feedback = self.feedback or ("",) * len(self)
    return tuple(Verdict(reward=float(r), success=bool(s), feedback=f)
                 for r, s, f in zip(self.rewards, self.successes, feedback))

  def peer_group(self) -> peers.Group:
    """The group as `peers` reads it: the teacher's problem text is the prompt the student read."""
    return peers.Group(prompt=self.prompt, responses=self.responses, verdicts=self.verdicts())

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema": ROLLOUT_SCHEMA, "example_id": self.example_id,
        "prompt": [m.as_dict() for m in self.prompt], "responses": list(self.responses),
        "rewards": [float(r) for r in self.rewards], "successes": [bool(s) for s in self.successes]}
    if self.response_tokens is not None:
      out["response_tokens"] = [list(t) for t in self.response_tokens]
    if self.feedback:
      out["feedback"] = list(self.feedback)
    if self.finish_reasons:
      out["finish_reasons"] = list(self.finish_reasons)
    if self.reference:
      out["reference"] = self.reference
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "RolloutGroup":
    if d.get("schema", ROLLOUT_SCHEMA) != ROLLOUT_SCHEMA:
      raise ValueError(f"rollout dump: unsupported schema {d.get('schema')!r} (expected {ROLLOUT_SCHEMA!r})")
    tokens = d.get("response_tokens")
    return cls(
        example_id=str(d.get("example_id", "")),
        prompt=tuple(Message(m["role"], m["content"]) for m in d["prompt"]),
        responses=tuple(d["responses"]), rewards=tuple(float(r) for r in d["rewards"]),
        successes=tuple(bool(s) for s in d["successes"]),
        response_tokens=None if tokens is None else tuple(tuple(int(t) for t in row) for row in tokens),
        feedback=tuple(d.get("feedback", ())), finish_reasons=tuple(d.get("finish_reasons", ())),
        reference=str(d.get("reference", "")))


def write_rollouts(path: str | os.PathLike, groups: Iterable[RolloutGroup],
                   extras: Optional[Sequence[dict[str, Any]]] = None) -> pathlib.Path:
  """One JSON line per group; `extras[i]` (optional) adds keys to line i."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    for i, g in enumerate(groups):
      row = g.to_json()
      if extras is not None:
        row.update(extras[i])
      f.write(json.dumps(row, allow_nan=False) + "\n")
  return path


def read_rollouts(path: str | os.PathLike) -> list[RolloutGroup]:
  with open(path) as f:
    return [RolloutGroup.from_json(json.loads(line)) for line in f if line.strip()]


# ----------------------------------------------------------------------------- the prompt


def chat_prompt_tokens(tokenizer: Tokenizer, messages: Sequence[Message], enable_thinking: bool) -> list[int]:
  return tokenizer.apply_chat_template(
      [m.as_dict() for m in messages], add_generation_prompt=True, enable_thinking=enable_thinking)


def student_messages(example: Example, peer_config: Optional[peers.PeerConfig]) -> tuple[Message, ...]:
  """The chat messages the student samples `example` from: in training (a `peer_config`)
  `peers.student_prompt` (the summaries variant's instruction), in evaluation (None) its own
  prompt. One function for the sampler and the overlong-prompt filter, so both see one prompt."""
  return tuple(example.prompt) if peer_config is None else peers.student_prompt(example.prompt, peer_config)


def sampling_params(config, *, temperature: float, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
                    pad_id: int = 0, top_p: Optional[float] = None) -> sampling_lib.SamplingParams:
  """How the run samples (training rollouts and evaluation differ in temperature, top-p and
  length). top_p: None = `sampling.top_p` (training's); evaluation passes `eval.top_p`."""
  return sampling_lib.SamplingParams(
      temperature=temperature, top_p=config.sampling.top_p if top_p is None else top_p,
      top_k=config.sampling.top_k or None,
      max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids), pad_id=pad_id,
      stop_strings=tuple(config.sampling.stop_strings), prompt_buckets=tuple(config.data.prompt_buckets),
      generation_buckets=tuple(config.data.response_buckets),
      decode_rows=config.sampling.decode_rows or None, refill_free_rows=config.sampling.refill_free_rows or None)


# ----------------------------------------------------------------------------- sampling


def _by_prompt(rows: Sequence[T], group_size: int) -> list[tuple[T, ...]]:
  """The sampler's flat rows split into groups: row r belongs to prompt r // group_size."""
  return [tuple(rows[p * group_size:(p + 1) * group_size]) for p in range(len(rows) // group_size)]


def sample_and_verify(run: Any, examples: Sequence[Example], rng, *, group_size: int, temperature: float,
                      max_new_tokens: int, first_prompt_id: int = 0, training: bool = False,
                      top_p: Optional[float] = None) -> list[RolloutGroup]:
  """G rollouts per example, verified: one `RolloutGroup` per example, in order.

  run: what sampling reads of a `trainer.Run` (config, tokenizer, sampler_graphdef,
  sampler_params(), sample_mesh, verifier_pool; peer_config when training), e.g.
  `evaluate.SamplerRun`. `first_prompt_id`: the global index of examples[0], which keys each
  prompt's random stream (see `sampling.sample`). training: sample from `peers.student_prompt`
  (the summaries variant's instruction) and apply `verifier.success_threshold`; evaluation (the
  default) samples the task's own prompt, as the authors' validation does. top_p: see
  `sampling_params`.
  """
  cfg = run.config
  messages = [student_messages(e, run.peer_config if training else None) for e in examples]
  prompts = [chat_prompt_tokens(run.tokenizer, m, cfg.sampling.enable_thinking) for m in messages]
  params = sampling_params(cfg, temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p,
                           stop_token_ids=tuple(run.tokenizer.eos_ids), pad_id=run.tokenizer.pad_id)
  result = sampling_lib.sample(
      (run.sampler_graphdef, run.sampler_params()), prompts, num_samples=group_size, rng=rng,
      sampling_params=params, mesh=run.sample_mesh,
      decode_fn=lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True),
      prompt_ids=[first_prompt_id + i for i in range(len(prompts))])
  lengths = [int(result.lengths[r]) for r in range(result.num_rows)]
  responses = [tuple(result.tokens[r, :n].tolist()) for r, n in enumerate(lengths)]
  # Old-policy log-probs at the sampling temperature (the trainer's distribution).
  logprobs = [tuple(result.scaled_logprobs[r, :n].tolist()) for r, n in enumerate(lengths)]
  texts = [result.texts[r] for r in range(result.num_rows)]
  # One call for every row: the pool spreads them over its workers.
  verdicts = run.verifier_pool.verify([e for e in examples for _ in range(group_size)], texts,
                                      deadline_s=cfg.verifier.deadline_s)
  broken = [v for v in verdicts if v.details.get("error") == "WorkerSetup"]
  if broken:
    # Infrastructure, not the model: training on all-zero rewards would be silently wrong.
    raise TrainingError(
        f"verifier workers could not start ({broken[0].feedback}); scripts that call the trainer must guard "
        "their entry point with `if __name__ == '__main__':` (workers re-import the main module)")
  if training:  # who counts as a peer success (and what verified SFT trains on); eval keeps full solves
    verdicts = [apply_success_threshold(v, cfg.verifier.success_threshold) for v in verdicts]
  per_prompt = zip(*(_by_prompt(rows, group_size) for rows in (
      responses, logprobs, texts, verdicts, [f.value for f in result.finish_reasons])))
  return [group_of(e, m, p, *rows) for e, m, p, rows in zip(examples, messages, prompts, per_prompt)]


def group_of(example: Example, messages: Sequence[Message], prompt_tokens: Sequence[int],
             response_tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]], texts: Sequence[str],
             verdicts: Sequence[Verdict], finish_reasons: Sequence[str]) -> RolloutGroup:
  """One example's sampled and verified rollouts as a record."""
  return RolloutGroup(
      example_id=example.example_id, prompt=tuple(messages), responses=tuple(texts),
      rewards=tuple(v.reward for v in verdicts), successes=tuple(v.success for v in verdicts),
      response_tokens=tuple(tuple(t) for t in response_tokens), feedback=tuple(v.feedback for v in verdicts),
      finish_reasons=tuple(finish_reasons),
      reference=example.reference if isinstance(example.reference, str) else "",
      prompt_tokens=tuple(prompt_tokens), response_logprobs=tuple(tuple(x) for x in logprobs))


def sample_groups(run: Any, examples: Sequence[Example], rng: jax.Array, *, num_samples: int, temperature: float,
                  max_new_tokens: int, batch_prompts: int, fold_in_start: bool, top_p: Optional[float] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> list[RolloutGroup]:
  """The evaluation loop: G = num_samples verified responses for every example (its own prompt),
  `batch_prompts` prompts per sampling call.

  Random streams of the call for examples[start:]: fold_in_start=False (the trainer's held-out
  eval) keeps `rng` and numbers prompts globally (first prompt id `start`); True (`evaluate`, the
  analysis) folds `start` into `rng` and numbers each call's prompts from 0. Each keeps its
  callers' earlier results. Every process evaluates the same prompts (the same ids, so the same
  rows); a prompt's G rows stay on one shard: each call is padded to a multiple of this
  process's share of the batch shards. progress: called with (groups done, total).
  """
  mesh = run.sample_mesh
  shards = 1 if mesh is None else max(sharding.num_batch_shards(mesh) // jax.process_count(), 1)
  chunk = max(batch_prompts, 1)
  groups: list[RolloutGroup] = []
  for start in range(0, len(examples), chunk):
    part = list(examples[start:start + chunk])
    key, first_prompt_id = (jax.random.fold_in(rng, start), 0) if fold_in_start else (rng, start)
    sampled = sample_and_verify(
        run, part + [part[0]] * (-len(part) % shards), key, group_size=num_samples, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, first_prompt_id=first_prompt_id)
    groups += sampled[:len(part)]
    if progress is not None:
      progress(len(groups), len(examples))
  return groups


# ----------------------------------------------------------------------------- teacher contexts


def teacher_contexts(groups: Sequence[RolloutGroup], peer_config: peers.PeerConfig, *,
                     count_tokens: peers.CountTokens, count_prompt_tokens: Optional[peers.CountPromptTokens],
                     step: int = 0, first_group_index: int = 0) -> list[list[peers.TeacherContext]]:
  """`peers.build_teacher_contexts` over the groups (result[g][i]); group g draws as global
  group `first_group_index + g` of the step. Training and the analysis both build through here."""
  return peers.build_teacher_contexts(
      [g.peer_group() for g in groups], peer_config, step=step,
      group_indices=[first_group_index + i for i in range(len(groups))],
      count_tokens=count_tokens, count_prompt_tokens=count_prompt_tokens)


@dataclasses.dataclass(frozen=True)
class TokenCounts:
  """How teacher prompts are measured with a real tokenizer."""

  count_tokens: peers.CountTokens  # one text's tokens (sizes matched-budget controls)
  count_prompt_tokens: peers.CountPromptTokens  # a whole prompt, chat-templated


def token_counts(tokenizer: Tokenizer, enable_thinking: bool) -> TokenCounts:
  # The limit bounds the templated prompt, the length the teacher's bucket must hold.
  return TokenCounts(
      count_tokens=lambda text: len(tokenizer.encode(text)),
      count_prompt_tokens=lambda messages: len(chat_prompt_tokens(tokenizer, messages, enable_thinking)))


def with_teacher_contexts(groups: Sequence[RolloutGroup], peer_config: peers.PeerConfig, tokenizer: Tokenizer, *,
                          enable_thinking: bool, step: int = 0, first_group_index: int = 0) -> list[RolloutGroup]:
  """The groups with every rollout's teacher context and its chat-templated tokens."""
  counts = token_counts(tokenizer, enable_thinking)
  contexts = teacher_contexts(groups, peer_config, count_tokens=counts.count_tokens,
                              count_prompt_tokens=counts.count_prompt_tokens, step=step,
                              first_group_index=first_group_index)
  return [dataclasses.replace(
      g, contexts=tuple(row),
      teacher_prompt_tokens=tuple(tuple(chat_prompt_tokens(tokenizer, c.messages, enable_thinking)) for c in row))
      for g, row in zip(groups, contexts)]


# ----------------------------------------------------------------------------- to the batch


def batch_rows(groups: Sequence[RolloutGroup], *, token_text: Optional[Callable[[int], str]] = None
               ) -> batching.RolloutRows:
  """The groups' rollouts as batch rows: group by group, each group's rollouts in order (the
  sampler's row order); group_ids = the group's position. The groups need teacher contexts.
  token_text: a token id's text, for step-level losses' step ids (None: no step ids)."""
  missing = [g.example_id for g in groups if not g.contexts or g.response_logprobs is None or not g.prompt_tokens]
  if missing:
    raise ValueError(f"batch_rows: groups {missing} lack sampler tokens or teacher contexts")
  rollouts = [(p, g, i) for p, g in enumerate(groups) for i in range(len(g))]
  responses = [g.response_tokens[i] for _, g, i in rollouts]
  return batching.RolloutRows(
      student_prompts=[g.prompt_tokens for _, g, _ in rollouts],
      teacher_prompts=[g.teacher_prompt_tokens[i] for _, g, i in rollouts],
      responses=responses,
      sampler_logprobs=[g.response_logprobs[i] for _, g, i in rollouts],
      distill_mask=[g.contexts[i].distill_mask for _, g, i in rollouts],
      rewards=[g.rewards[i] for _, g, i in rollouts],
      success=[g.successes[i] for _, g, i in rollouts],
      group_ids=[p for p, _, _ in rollouts],
      step_ids=None if token_text is None else [
          batching.step_ids_from_text_offsets([token_text(t) for t in r]) for r in responses])
