"""Teacher-signal analysis (spec section 6): do peer contexts make teacher scores track rewards?

    python -m mopd_jax.analysis.teacher_signal --config=configs/teacher_signal.py        # SmolLM2
    python -m mopd_jax.analysis.teacher_signal --config=configs/teacher_signal.py:tiny   # smoke run
    python -m mopd_jax.analysis.teacher_signal --config.analysis.rollouts_in=runs/x/rollouts.jsonl

1. Freeze rollouts: sample G responses per prompt with the student and verify them
   (`rollouts.sample_groups`, i.e. the trainer's sampler and verifiers), then write them to
   `<out_dir>/rollouts.jsonl` (schema: `rollouts.RolloutGroup`); or read such a dump
   (`analysis.rollouts_in`; `evaluate`'s items.jsonl is one too).
2. Build every response's teacher context under each *variant* (`VARIANTS`, below): for
   response i of a prompt, the context built for i from its peers (i itself never appears).
   Variants that are a `PeerConfig` build through training's own path
   (`rollouts.teacher_contexts`), measuring the teacher prompt as training does: chat-templated
   tokens against `analysis.max_teacher_prompt_len` (`variant_options`).
3. Score each response's tokens, teacher-forced, under each of its contexts with the teacher
   (the student model itself unless `analysis.teacher_checkpoint`), at the sampling
   temperature, with `scoring.score_pairs`: every distinct context is encoded once and
   shared by all responses scored under it, across variants too.
4. Per variant and prompt: `PromptRecord(scores = sum of response log-probs, rewards,
   successes, teacher prompt lengths)` -> `report.summarize_conditions` -> `write_report`
   (summary.json, summary.md, PNGs). The same statistics with the mean log-prob as score go
   to summary_mean.{json,md}. summary.md gets extra sections: the run, how often each variant
   actually added something (a variant with no eligible peer falls back to the plain prompt),
   and paired differences against `base` (the right test for "variant A aligns better").
   Raw per-response scores: scores.jsonl.

Variants (no variant shows feedback: feedback on i itself would leak i's own verdict):
  base               the plain prompt (the student's own likelihood)
  solution           first other success ("Correct solution:")
  another_solution   the next other success only ("Another successful solution:")
  failure            a random other failure
  solution+failure   first other success + a random other failure
  2s1f               the MOPD context: two other successes + a random failure
  all_solutions      every other success, labelled as correct solutions
  random_peer        control: as many random peers as 2S1F has blocks, neutral label
  unrelated_prompt   control: as many successes of *other* prompts, neutral label
  top<N>_reward      control: the N other responses with the highest reward (ties: lower
                     index first), neutral label; N in the name, e.g. top3_reward
The peers.py options are used where they map (`PeerConfig` with feedback off); the rest
(all_solutions, top<N>_reward: no peers.py mode) are small functions producing the same
`TeacherContext` records and message layout, measured with the same token counts (they drop
trailing sections whole to fit, where peers.py cuts section text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from mopd_jax import evaluate as evaluate_lib
from mopd_jax import peers, sharding
from mopd_jax import rollouts as rollouts_lib
from mopd_jax.analysis import report, scoring
from mopd_jax.analysis import stats as st
from mopd_jax.rollouts import RolloutGroup
from mopd_jax.tasks import loading as task_loading
from mopd_jax.weights import loading as model_loading
from mopd_jax.logging_lib import quiet_library_logs
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.types import Message

DEFAULT_VARIANTS: tuple[str, ...] = (
    "base", "solution", "another_solution", "failure", "solution+failure", "2s1f", "all_solutions",
    "random_peer", "top3_reward")


# ----------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class VariantOptions:
  """Shared settings of every variant's context construction."""

  seed: int = 0
  max_teacher_prompt_len: int = 10240
  labels: peers.PeerLabels = peers.PeerLabels()
  count_tokens: peers.CountTokens = peers.approx_token_count
  # A whole teacher prompt's length (training's: chat-templated tokens, `variant_options`);
  # None: `count_tokens` summed over the message contents.
  count_prompt_tokens: Optional[peers.CountPromptTokens] = None

  def prompt_length(self, messages: Sequence[Message]) -> int:
    return (self.count_prompt_tokens or peers.content_tokens(self.count_tokens))(messages)


def variant_options(config, tokenizer: Tokenizer) -> VariantOptions:
  """The run's variant settings, with training's token counts (`rollouts.token_counts`)."""
  counts = rollouts_lib.token_counts(tokenizer, config.sampling.enable_thinking)
  return VariantOptions(seed=config.seed, max_teacher_prompt_len=config.analysis.max_teacher_prompt_len,
                        count_tokens=counts.count_tokens, count_prompt_tokens=counts.count_prompt_tokens)


Contexts = list[list[peers.TeacherContext]]  # [prompt][response]
VariantFn = Callable[[Sequence[RolloutGroup], VariantOptions], Contexts]
VARIANTS: dict[str, VariantFn] = {}


def register_variant(name: str) -> Callable[[VariantFn], VariantFn]:
  def register(fn: VariantFn) -> VariantFn:
    if name in VARIANTS:
      raise ValueError(f"teacher-signal variant {name!r} is already registered")
    VARIANTS[name] = fn
    return fn
  return register


_TOP_N = re.compile(r"top(\d+)_reward")


def get_variant(name: str) -> VariantFn:
  """The registered variant, or a top-N-by-reward control for names "top<N>_reward"."""
  if name in VARIANTS:
    return VARIANTS[name]
  match = _TOP_N.fullmatch(name)
  if match and int(match.group(1)) >= 1:
    n = int(match.group(1))
    return lambda groups, options: top_reward_contexts(groups, options, n)
  raise ValueError(f"unknown teacher-signal variant {name!r}; known: {sorted(VARIANTS)} and top<N>_reward")


PEER_VARIANTS: dict[str, dict[str, Any]] = {}  # name -> its PeerConfig fields


def variant_peer_config(name: str, options: VariantOptions) -> peers.PeerConfig:
  """The `PeerConfig` of a peer variant (feedback always off)."""
  return peers.PeerConfig(
      include_feedback=False, seed=options.seed, max_teacher_prompt_len=options.max_teacher_prompt_len,
      labels=options.labels, **PEER_VARIANTS[name])


def _peer_variant(name: str, **fields: Any) -> None:
  """A variant that is a `PeerConfig`, built as training builds its contexts."""
  PEER_VARIANTS[name] = fields

  def build(groups: Sequence[RolloutGroup], options: VariantOptions) -> Contexts:
    return rollouts_lib.teacher_contexts(
        groups, variant_peer_config(name, options), count_tokens=options.count_tokens,
        count_prompt_tokens=options.count_prompt_tokens)
  register_variant(name)(build)


_OFF = dict(include_primary=False, include_another=False, include_failure=False)
_peer_variant("base", **_OFF)
_peer_variant("solution", **{**_OFF, "include_primary": True})
_peer_variant("another_solution", **{**_OFF, "include_another": True})
_peer_variant("failure", **{**_OFF, "include_failure": True}, failure_condition="always")
_peer_variant("solution+failure", include_primary=True, include_another=False, include_failure=True,
              failure_condition="always")
_peer_variant("2s1f", include_primary=True, include_another=True, include_failure=True, failure_condition="always")
_peer_variant("random_peer", control="random_peer", control_match="block")
_peer_variant("unrelated_prompt", control="unrelated_prompt", control_match="block")


def _context(groups: Sequence[peers.Group], pos: int, i: int, sections: list[peers.Section],
             options: VariantOptions) -> peers.TeacherContext:
  """A TeacherContext from sections, in peers.py's layout; trailing sections are dropped while
  the prompt (as `options.prompt_length` measures it) exceeds max_teacher_prompt_len."""
  group = groups[pos]
  render = lambda secs: peers.teacher_messages(group.prompt, secs, options.labels)  # peers.py's layout
  truncated = False
  while sections and options.prompt_length(render(sections)) > options.max_teacher_prompt_len:
    sections, truncated = sections[:-1], True
  messages = render(sections)
  return peers.TeacherContext(
      group=pos, rollout=i, messages=tuple(messages), distill_mask=1.0 if sections else 0.0,
      sections=tuple(sections), truncated=truncated, num_tokens=options.prompt_length(messages))


def _section(groups: Sequence[peers.Group], kind: str, label: str, pos: int, j: int) -> peers.Section:
  return peers.Section(kind, label, groups[pos].responses[j].strip(), (peers.PeerRef(pos, j),))


@register_variant("all_solutions")
def all_solutions_contexts(rollouts: Sequence[RolloutGroup], options: VariantOptions) -> Contexts:
  """Every other success, the first labelled as the correct solution, the rest as others."""
  groups = [g.peer_group() for g in rollouts]
  labels = options.labels
  out = []
  for pos, group in enumerate(groups):
    row = []
    for i in range(len(group)):
      others = [j for j in group.successes if j != i]
      sections = [_section(groups, peers.PRIMARY, labels.primary, pos, j) if k == 0
                  else _section(groups, peers.ANOTHER, labels.another, pos, j) for k, j in enumerate(others)]
      row.append(_context(groups, pos, i, sections, options))
    out.append(row)
  return out


def top_reward_contexts(rollouts: Sequence[RolloutGroup], options: VariantOptions, n: int) -> Contexts:
  """Control: the n other responses with the highest reward, under the neutral label."""
  groups = [g.peer_group() for g in rollouts]
  out = []
  for pos, group in enumerate(groups):
    row = []
    for i in range(len(group)):
      ranked = sorted((j for j in range(len(group)) if j != i), key=lambda j: (-group.verdicts[j].reward, j))
      sections = [_section(groups, peers.CONTROL, options.labels.control, pos, j) for j in ranked[:n]]
      row.append(_context(groups, pos, i, sections, options))
    out.append(row)
  return out


# ------------------------------------------------------------------------------ scoring


@dataclasses.dataclass(frozen=True, eq=False)
class VariantScores:
  """One variant's teacher scores of every response. Lists are per prompt, arrays per response."""

  name: str
  sum_logprob: tuple[np.ndarray, ...]  # [P] of [G] float64
  mean_logprob: tuple[np.ndarray, ...]  # [P] of [G] float64
  context_tokens: tuple[np.ndarray, ...]  # [P] of [G] int: teacher prompt length (chat template included)
  has_context: tuple[np.ndarray, ...]  # [P] of [G] bool: something was added to the plain prompt
  truncated: tuple[np.ndarray, ...]  # [P] of [G] bool


@dataclasses.dataclass(frozen=True, eq=False)
class SignalScores:
  """Everything scored: variants in order, plus how much the scorer shared."""

  variants: tuple[VariantScores, ...]
  num_pairs: int  # (variant, response) pairs requested
  num_distinct_pairs: int  # forward rows actually scored
  num_contexts: int  # distinct contexts encoded
  seconds: float


def response_tokens(group: RolloutGroup, tokenizer: Tokenizer) -> list[list[int]]:
  """The sampled token ids when the dump has them, else the re-tokenised text."""
  if group.response_tokens is not None:
    return [list(t) for t in group.response_tokens]
  return [tokenizer.encode(text) for text in group.responses]


def build_variant_contexts(rollouts: Sequence[RolloutGroup], variants: Sequence[str], options: VariantOptions
                           ) -> dict[str, Contexts]:
  return {name: get_variant(name)(rollouts, options) for name in variants}


def score_variants(
    teacher: scoring.ModelLike,
    tokenizer: Tokenizer,
    rollouts: Sequence[RolloutGroup],
    contexts: dict[str, Contexts],
    *,
    params: scoring.ScoringParams,
    enable_thinking: bool = False,
    mesh=None,
    progress: bool = True,
) -> SignalScores:
  """Scores every response under its context in every variant, in one de-duplicated pass."""
  start = time.perf_counter()
  prompt_tokens: dict[tuple[Message, ...], tuple[int, ...]] = {}  # each distinct context templated once

  def template(messages: tuple[Message, ...]) -> tuple[int, ...]:
    if messages not in prompt_tokens:
      prompt_tokens[messages] = tuple(rollouts_lib.chat_prompt_tokens(tokenizer, messages, enable_thinking))
    return prompt_tokens[messages]

  responses = [response_tokens(g, tokenizer) for g in rollouts]
  pairs = [(template(ctx.messages), responses[p][i])
           for rows in contexts.values() for p, row in enumerate(rows) for i, ctx in enumerate(row)]
  bar = evaluate_lib.ProgressBar("teacher scoring (distinct pairs)", progress)
  result = scoring.score_pairs(teacher, pairs, params=params, mesh=mesh, progress=bar)
  bar.close()
  variants, k = [], 0
  for name, rows in contexts.items():
    sums, means, lengths, added, cut = [], [], [], [], []
    for row in rows:
      n = len(row)
      sums.append(result.sum_logprob[k:k + n])
      means.append(result.mean_logprob[k:k + n])
      lengths.append(result.context_lengths[k:k + n])
      added.append(np.array([bool(c.sections) for c in row]))
      cut.append(np.array([c.truncated for c in row]))
      k += n
    variants.append(VariantScores(name, tuple(sums), tuple(means), tuple(lengths), tuple(added), tuple(cut)))
  return SignalScores(variants=tuple(variants), num_pairs=len(pairs), num_distinct_pairs=result.num_pairs,
                      num_contexts=result.num_contexts, seconds=time.perf_counter() - start)


def prompt_records(rollouts: Sequence[RolloutGroup], scores: VariantScores, *, use_mean: bool = False
                   ) -> list[st.PromptRecord]:
  values = scores.mean_logprob if use_mean else scores.sum_logprob
  return [st.PromptRecord(scores=v, rewards=np.array(g.rewards), successes=np.array(g.successes),
                          prompt_lengths=lengths)
          for g, v, lengths in zip(rollouts, values, scores.context_tokens)]


def summarize(rollouts: Sequence[RolloutGroup], scores: SignalScores, *, use_mean: bool = False,
              n_resamples: int = 1000, seed: int = 0) -> report.AnalysisSummary:
  return report.summarize_conditions(
      {v.name: prompt_records(rollouts, v, use_mean=use_mean) for v in scores.variants},
      n_resamples=n_resamples, seed=seed)


# ------------------------------------------------------------------------------ outputs


def _fmt(x: float, digits: int = 3) -> str:
  return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def rollout_overview(rollouts: Sequence[RolloutGroup]) -> str:
  n = np.array([sum(g.successes) for g in rollouts])
  sizes = np.array([len(g) for g in rollouts])
  mixed = int(np.sum((n > 0) & (n < sizes)))
  lengths = [len(t) for g in rollouts for t in (g.response_tokens or ())]
  length = f"; mean response length {np.mean(lengths):.1f} tokens" if lengths else ""
  return (f"{len(rollouts)} prompts x {int(sizes.max())} responses; success rate {n.sum() / sizes.sum():.3f}; "
          f"prompts with both outcomes: {mixed}, all failed: {int(np.sum(n == 0))}, "
          f"all succeeded: {int(np.sum(n == sizes))}{length}")


def coverage_table(rollouts: Sequence[RolloutGroup], scores: SignalScores) -> str:
  """Per variant: how often a context was added, its length, mean scores by outcome."""
  successes = np.concatenate([np.array(g.successes, bool) for g in rollouts])
  lines = ["| variant | context added | truncated | mean teacher prompt tokens | mean sum log-prob "
           "(success / failure) | mean token log-prob (success / failure) |", "|---|---|---|---|---|---|"]
  for v in scores.variants:
    added, cut = np.concatenate(v.has_context), np.concatenate(v.truncated)
    s, m = np.concatenate(v.sum_logprob), np.concatenate(v.mean_logprob)
    by = lambda x: f"{_fmt(np.mean(x[successes]) if successes.any() else math.nan, 2)} / " \
                   f"{_fmt(np.mean(x[~successes]) if (~successes).any() else math.nan, 2)}"
    lines.append(f"| {v.name} | {added.mean():.2f} | {cut.mean():.2f} | "
                 f"{np.concatenate(v.context_tokens).mean():.1f} | {by(s)} | {by(m)} |")
  return "\n".join(lines)


PAIRED_METRICS: tuple[str, ...] = ("spearman", "success_auc", "pairwise_accuracy", "top1_hit")


def paired_table(summary: report.AnalysisSummary, reference: str = "base", subset: str = "mixed") -> str:
  """Mean per-prompt difference (variant - reference) with bootstrap CIs, over `subset` prompts."""
  if reference not in [c.condition for c in summary.conditions]:
    return f"(no `{reference}` condition to compare against)"
  ref = summary.condition(reference)
  keep = [k for k, p in enumerate(ref.prompts) if subset == "all" or p.has_both_outcomes]
  lines = ["| variant | " + " | ".join(f"{m} diff" for m in PAIRED_METRICS) + " |",
           "|---|" + "---|" * len(PAIRED_METRICS)]
  for c in summary.conditions:
    if c.condition == reference:
      continue
    cells = []
    for m in PAIRED_METRICS:
      ci = st.paired_difference_ci([c.prompts[k] for k in keep], [ref.prompts[k] for k in keep], m,
                                   n_resamples=summary.n_resamples, confidence=summary.confidence,
                                   seed=summary.seed)
      cells.append("n/a" if ci.n == 0 else f"{ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]")
    lines.append(f"| {c.condition} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_scores(path: pathlib.Path, rollouts: Sequence[RolloutGroup], scores: SignalScores) -> None:
  """scores.jsonl: one line per prompt, per variant the per-response scores and context sizes."""
  with open(path, "w") as f:
    for p, g in enumerate(rollouts):
      row = {"example_id": g.example_id, "rewards": list(map(float, g.rewards)),
             "successes": list(map(bool, g.successes)), "variants": {
                 v.name: {"sum_logprob": v.sum_logprob[p].tolist(), "mean_logprob": v.mean_logprob[p].tolist(),
                          "context_tokens": v.context_tokens[p].tolist(),
                          "context_added": v.has_context[p].tolist()} for v in scores.variants}}
      f.write(json.dumps(row) + "\n")


@dataclasses.dataclass(frozen=True)
class SignalPaths:
  out_dir: pathlib.Path
  rollouts: Optional[pathlib.Path]  # written when rollouts were sampled here
  scores: pathlib.Path
  report: Optional[report.ReportPaths]  # None without plots
  summary_json: pathlib.Path
  summary_markdown: pathlib.Path
  mean_json: pathlib.Path
  mean_markdown: pathlib.Path


def write_outputs(out_dir: str | os.PathLike, rollouts: Sequence[RolloutGroup], scores: SignalScores,
                  summary: report.AnalysisSummary, mean_summary: report.AnalysisSummary, *, header: str,
                  plots: bool = True, rollouts_path: Optional[pathlib.Path] = None) -> SignalPaths:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  report_paths = None
  if plots:
    report_paths = report.write_report(summary, out)
  else:
    (out / "summary.json").write_text(json.dumps(report.summary_to_dict(summary), indent=2, allow_nan=False) + "\n")
    (out / "summary.md").write_text(report.markdown_report(summary))
  markdown = out / "summary.md"
  extra = [
      "", "## Run", "", header, "", rollout_overview(rollouts), "",
      f"Scored {scores.num_pairs} (variant, response) pairs: {scores.num_distinct_pairs} distinct pairs over "
      f"{scores.num_contexts} distinct contexts, {scores.seconds:.0f} s.", "",
      "## Context coverage", "",
      "A variant adds nothing for a response with no eligible peer (e.g. `solution` when no other "
      "response succeeded); that response is then scored under the plain prompt.", "",
      coverage_table(rollouts, scores), "",
      "## Paired differences against `base` (prompts with both outcomes, score = sum log-prob)", "",
      "Per-prompt metric(variant) - metric(base), mean over prompts with a 95% bootstrap CI.", "",
      paired_table(summary), ""]
  markdown.write_text(markdown.read_text() + "\n".join(extra))
  mean_json, mean_md = out / "summary_mean.json", out / "summary_mean.md"
  mean_json.write_text(json.dumps(report.summary_to_dict(mean_summary), indent=2, allow_nan=False) + "\n")
  mean_md.write_text(report.markdown_report(mean_summary).replace(
      "# Teacher-signal analysis", "# Teacher-signal analysis (score = mean token log-prob)", 1) + "\n".join([
          "", "## Paired differences against `base` (prompts with both outcomes, score = mean token log-prob)", "",
          paired_table(mean_summary), ""]))
  scores_path = out / "scores.jsonl"
  write_scores(scores_path, rollouts, scores)
  return SignalPaths(out_dir=out, rollouts=rollouts_path, scores=scores_path,
                     report=report_paths, summary_json=out / "summary.json", summary_markdown=markdown,
                     mean_json=mean_json, mean_markdown=mean_md)


# ------------------------------------------------------------------------------ the run


def freeze_rollouts(config, run: evaluate_lib.SamplerRun, out_dir: pathlib.Path
                    ) -> tuple[list[RolloutGroup], Optional[pathlib.Path]]:
  """Samples and verifies G responses per prompt and dumps them (returns the dump's path), or
  reads `analysis.rollouts_in` (path None)."""
  a = config.analysis
  if a.rollouts_in:
    return rollouts_lib.read_rollouts(a.rollouts_in)[:a.num_prompts or None], None
  train, _ = task_loading.load_examples(config)
  examples = train[:a.num_prompts] if a.num_prompts else train
  bar = evaluate_lib.ProgressBar("sampling rollouts", a.progress)
  groups = rollouts_lib.sample_groups(
      run, examples, jax.random.key(config.seed), num_samples=config.sampling.group_size,
      temperature=config.sampling.temperature, max_new_tokens=config.sampling.max_new_tokens,
      batch_prompts=a.sample_batch_prompts, fold_in_start=True, progress=bar)
  bar.close()
  return groups, rollouts_lib.write_rollouts(out_dir / "rollouts.jsonl", groups)


def scoring_params(config, pad_id: int) -> scoring.ScoringParams:
  a = config.analysis
  return scoring.ScoringParams(
      temperature=a.temperature if a.temperature > 0 else config.sampling.temperature,
      context_buckets=tuple(a.context_buckets), response_buckets=tuple(a.response_buckets),
      context_batch=a.context_batch, response_batch=a.response_batch, chunk_size=a.chunk_size, pad_id=pad_id)


def run_analysis(config) -> tuple[SignalPaths, report.AnalysisSummary]:
  a = config.analysis
  start = time.perf_counter()
  out_dir = pathlib.Path(a.out_dir or os.path.join("runs", f"teacher-signal-{int(time.time())}"))
  out_dir.mkdir(parents=True, exist_ok=True)
  graphdef, params, tokenizer, description = evaluate_lib.load_model(config, config.model.checkpoint)
  run = evaluate_lib.make_sampler_run(config, graphdef, params, tokenizer)
  rollouts, rollouts_path = freeze_rollouts(config, run, out_dir)
  if not rollouts:
    raise ValueError("config.analysis: no rollouts to analyse")
  teacher, teacher_description = (run.sampler_graphdef, run.params), f"the student ({description})"
  if a.teacher_checkpoint:
    t_graphdef, t_params, t_tokenizer, teacher_description = evaluate_lib.load_model(config, a.teacher_checkpoint)
    model_loading.check_same_tokenizer(tokenizer, t_tokenizer)
    teacher = (t_graphdef, sharding.shard_params(t_params, run.sample_mesh))
  contexts = build_variant_contexts(rollouts, tuple(a.variants), variant_options(config, tokenizer))
  params_ = scoring_params(config, tokenizer.pad_id)
  scores = score_variants(teacher, tokenizer, rollouts, contexts, params=params_,
                          enable_thinking=config.sampling.enable_thinking, mesh=run.sample_mesh, progress=a.progress)
  summary = summarize(rollouts, scores, n_resamples=a.n_resamples, seed=a.bootstrap_seed)
  mean_summary = summarize(rollouts, scores, use_mean=True, n_resamples=a.n_resamples, seed=a.bootstrap_seed)
  source = f"rollouts from `{a.rollouts_in}`" if a.rollouts_in else (
      f"rollouts sampled here: temperature {config.sampling.temperature}, max_new_tokens "
      f"{config.sampling.max_new_tokens}, task `{config.data.task}` {json.dumps(_plain(config.data.options))}")
  header = (f"Student: {description}. Teacher: {teacher_description}, temperature {params_.temperature}. "
            f"{source}. Total time {time.perf_counter() - start:.0f} s.")
  paths = write_outputs(out_dir, rollouts, scores, summary, mean_summary, header=header, plots=a.plots,
                        rollouts_path=rollouts_path)
  return paths, summary


def _plain(x: Any) -> Any:
  """ConfigDict / tuples -> JSON-able plain values (for the report header)."""
  if hasattr(x, "items"):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def run() -> None:
  from absl import app
  from ml_collections import config_flags

  import configs

  default = os.path.join(os.path.dirname(configs.__file__), "teacher_signal.py")
  config = config_flags.DEFINE_config_file("config", default, "Analysis configuration (a get_config file).",
                                           lock_config=True)

  def main(argv) -> None:
    del argv
    quiet_library_logs()
    paths, _ = run_analysis(config.value)
    print(paths.summary_markdown.read_text())
    print(f"[teacher_signal] outputs in {paths.out_dir}")

  app.run(main)


if __name__ == "__main__":
  run()
