"""mean@k / pass@k of a checkpoint on a task, per-item results, and sample diversity.

    python -m mopd_jax.evaluate --checkpoint=smollm2-gguf --task=basic_arithmetic --k=8 --num_items=100
    python -m mopd_jax.evaluate --config=configs/evaluate.py:tiny          # smoke run, random tiny model
    python -m mopd_jax.evaluate --checkpoint=runs/default/checkpoints      # a trainer run (orbax)
    python -m mopd_jax.evaluate --config.eval.temperature=0.7 --out=runs/eval_t07

The config is the training config tree (`configs/evaluate.py` = `configs/default.py` plus an
`evaluate` section), so a run's own config evaluates its model on its held-out prompts with
the same prompt format, sampler settings (`config.sampling`, `config.data.*_buckets`) and
verifier; `config.eval` holds k (`num_samples`), temperature, top_p, max_new_tokens, batch_prompts.
Prompts longer than `data.max_prompt_len` are dropped first, as the trainer does.

Checkpoints (`--checkpoint`, i.e. `config.evaluate.checkpoint`; "" = `config.model.checkpoint`):
- a `.gguf` file, a Hugging Face directory, or "smollm2-gguf": loaded as the model;
- an orbax directory, either a trainer run's `checkpoint.dir` (latest step, or
  `evaluate.step`; `evaluate.params` = "student" or "teacher") or one params pytree written by
  `checkpointing.save_params`: the model's structure and tokenizer come from `config.model`
  (the checkpoint the run started from), the params from orbax.

Outputs in `evaluate.out_dir`:
  items.jsonl   one line per item: the rollout-dump fields (see `rollouts.RolloutGroup`, readable by
                `analysis.teacher_signal` as frozen rollouts) + pass@k per k + diversity
  summary.json  mean@k, pass@k for every k in `evaluate.ks` (default 1, 2, 4, ..., k), mean
                reward, response lengths, diversity averaged over items
  summary.md    the same as a table

Sampling and verification are the trainer's (`rollouts.sample_groups`, the evaluation loop the
trainer's held-out eval runs too), driven through `SamplerRun`, the part of `trainer.Run` they read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from mopd_jax import checkpointing, config_lib, rollouts, sharding
from mopd_jax.diversity import Diversity, group_diversity, mean_diversity
from mopd_jax.logging_lib import quiet_library_logs
from mopd_jax.passk import PassAtK, aggregate_pass_at_k, pass_at_k
from mopd_jax.rollouts import RolloutGroup, write_rollouts
from mopd_jax.tasks import loading as task_loading
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.types import Example
from mopd_jax.verifiers.base import VerifierPool, default_pool
from mopd_jax.weights import loading as model_loading


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SamplerRun:
  """What `rollouts.sample_and_verify` reads from a `trainer.Run`: a frozen model, no optimizer.

  `config` must carry the trainer's `sampling`, `data.*_buckets` and `verifier` fields
  (any config built on `config_lib.base_config()` does).
  """

  config: Any
  tokenizer: Tokenizer
  sampler_graphdef: nnx.GraphDef
  params: nnx.State
  sample_mesh: Any
  verifier_pool: VerifierPool

  def sampler_params(self) -> nnx.State:
    return self.params


class ProgressBar:
  """A tqdm bar on stderr, created at the first report (when the total is known); a no-op when
  disabled. Call it with (done, total)."""

  def __init__(self, desc: str, enabled: bool = True):
    self.desc, self.enabled, self._bar = desc, enabled, None

  def __call__(self, done: int, total: int) -> None:
    if not self.enabled:
      return
    if self._bar is None:
      from tqdm import tqdm
      self._bar = tqdm(total=total, desc=self.desc, dynamic_ncols=True, file=sys.stderr)
    self._bar.update(done - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ---------------------------------------------------------------------------- loading


def load_model(config, checkpoint: str = "", *, which: str = "student", step: Optional[int] = None
               ) -> tuple[nnx.GraphDef, nnx.State, Tokenizer, str]:
  """(graphdef, params, tokenizer, description) for `checkpoint` (see the module docstring)."""
  m = config.model
  path = pathlib.Path(checkpoint) if checkpoint else None
  orbax_run = path is not None and checkpointing.is_run_dir(path)
  orbax_params = path is not None and not orbax_run and checkpointing.is_params_dir(path)
  base = m.checkpoint if (orbax_run or orbax_params or not checkpoint) else checkpoint
  model, tokenizer = model_loading.load_model_and_tokenizer(m.preset, base, m.tokenizer, m.param_dtype, m.dtype,
                                                            config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  description = base or f"random {m.preset}"
  if orbax_run:
    params, restored_step = checkpointing.restore_run_params(path, params, step=step, which=which)
    description = f"{path} (step {restored_step}, {which} params; structure from {description})"
  elif orbax_params:
    params = checkpointing.restore_params(path, params)
    description = f"{path} (params; structure from {description})"
  return graphdef, params, tokenizer, description


def make_sampler_run(config, graphdef: nnx.GraphDef, params: nnx.State, tokenizer: Tokenizer) -> SamplerRun:
  mesh = sharding.make_mesh(sharding.MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
  return SamplerRun(
      config=config, tokenizer=tokenizer, sampler_graphdef=graphdef, params=sharding.shard_params(params, mesh),
      # The process-wide pool: closed at exit, so never close it here.
      sample_mesh=mesh, verifier_pool=default_pool(config.verifier.num_workers))


# ------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class ItemResult:
  """One evaluated item: its rollouts, pass@k per k, and the diversity of its samples."""

  group: RolloutGroup
  pass_at: tuple[float, ...]  # aligned with EvaluationSummary.ks
  diversity: Diversity

  def extras(self, ks: Sequence[int]) -> dict[str, Any]:
    return {"n_success": int(sum(self.group.successes)),
            "pass_at_k": {str(k): v for k, v in zip(ks, self.pass_at)},
            "diversity": _json_numbers(dataclasses.asdict(self.diversity))}


@dataclasses.dataclass(frozen=True)
class EvaluationSummary:
  checkpoint: str
  task: str
  num_items: int
  num_samples: int  # n samples per item (the k of mean@k)
  temperature: float
  max_new_tokens: int
  ks: tuple[int, ...]
  pass_at_k: tuple[PassAtK, ...]  # one per k
  mean_at_k: float  # mean success over all samples of all items
  mean_reward: float
  mean_response_tokens: float
  length_finish_frac: float  # samples cut by max_new_tokens
  diversity: Diversity  # per-item diversity averaged over items
  seconds: float
  top_p: float = 1.0


def default_ks(n: int) -> tuple[int, ...]:
  """1, 2, 4, ... below n, and n."""
  ks = [2**i for i in range(int(math.log2(n)) + 1) if 2**i < n]
  return tuple(ks + [n])


def summarize(groups: Sequence[RolloutGroup], ks: Sequence[int], *, checkpoint: str, task: str, temperature: float,
              max_new_tokens: int, seconds: float = 0.0, top_p: float = 1.0
              ) -> tuple[EvaluationSummary, list[ItemResult]]:
  """pass@k (unbiased, `passk.pass_at_k`), mean@k and diversity from verified groups."""
  successes = [g.successes for g in groups]
  stats = aggregate_pass_at_k(successes, ks=tuple(ks))
  items = [ItemResult(group=g, pass_at=tuple(pass_at_k(len(g), int(sum(g.successes)), k) for k in ks),
                      diversity=group_diversity(g.responses)) for g in groups]
  lengths = [len(t) for g in groups for t in (g.response_tokens or ())]
  reasons = [r for g in groups for r in g.finish_reasons]
  summary = EvaluationSummary(
      checkpoint=checkpoint, task=task, num_items=len(groups), num_samples=len(groups[0]),
      temperature=float(temperature), max_new_tokens=int(max_new_tokens), ks=tuple(int(k) for k in ks),
      pass_at_k=stats, mean_at_k=float(np.mean([np.mean(s) for s in successes])),
      mean_reward=float(np.mean([np.mean(g.rewards) for g in groups])),
      mean_response_tokens=float(np.mean(lengths)) if lengths else math.nan,
      length_finish_frac=float(np.mean([r == "length" for r in reasons])) if reasons else math.nan,
      diversity=mean_diversity([g.responses for g in groups]), seconds=float(seconds), top_p=float(top_p))
  return summary, items


def _json_numbers(d: dict[str, Any]) -> dict[str, Any]:
  # Strict JSON: an undefined metric (NaN, e.g. pairwise similarity of one sample) is null.
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def summary_to_dict(s: EvaluationSummary) -> dict[str, Any]:
  out = _json_numbers({f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                       if f.name not in ("pass_at_k", "diversity", "ks")})
  out["ks"] = list(s.ks)
  out["pass_at_k"] = {str(p.k): p.pass_at_k for p in s.pass_at_k}
  out["diversity"] = _json_numbers(dataclasses.asdict(s.diversity))
  return out


def markdown_summary(s: EvaluationSummary) -> str:
  def pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"
  d = s.diversity
  lines = [
      "# Evaluation", "",
      f"checkpoint: `{s.checkpoint}`; task: `{s.task}`; {s.num_items} items x {s.num_samples} samples; "
      f"temperature {s.temperature}; top-p {s.top_p}; max_new_tokens {s.max_new_tokens}; {s.seconds:.0f} s", "",
      "| metric | value |", "|---|---|",
      f"| mean@{s.num_samples} (success) | {pct(s.mean_at_k)} |",
      *[f"| pass@{p.k} | {pct(p.pass_at_k)} |" for p in s.pass_at_k],
      f"| mean reward | {s.mean_reward:.3f} |",
      f"| mean response tokens | {s.mean_response_tokens:.1f} |",
      f"| cut at max_new_tokens | {pct(s.length_finish_frac)} |",
      f"| distinct-1 / -2 / -3 / -4 (per item) | {d.distinct_1:.3f} / {d.distinct_2:.3f} / "
      f"{d.distinct_3:.3f} / {d.distinct_4:.3f} |",
      f"| pairwise {d.jaccard_n}-gram Jaccard (per item) | {d.jaccard_similarity:.3f} |",
      f"| pairwise edit similarity (per item) | {d.edit_similarity:.3f} |",
  ]
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class EvaluationPaths:
  items: pathlib.Path
  json: pathlib.Path
  markdown: pathlib.Path


def write_results(out_dir: str | os.PathLike, summary: EvaluationSummary, items: Sequence[ItemResult]
                  ) -> EvaluationPaths:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = EvaluationPaths(items=out / "items.jsonl", json=out / "summary.json", markdown=out / "summary.md")
  write_rollouts(paths.items, [i.group for i in items], extras=[i.extras(summary.ks) for i in items])
  paths.json.write_text(json.dumps(summary_to_dict(summary), indent=2, allow_nan=False) + "\n")
  paths.markdown.write_text(markdown_summary(summary))
  return paths


def eval_examples(config) -> list[Example]:
  """`evaluate.split`: "held_out" (the trainer's eval prompts), "train", or "all" (the task's
  examples as listed, for fixed benchmarks); the first `evaluate.num_items` (0 = all)."""
  e = config.evaluate
  if e.split == "all":
    options = dict(config.data.options)
    if config.data.path:
      options.setdefault("path", config.data.path)
    from mopd_jax.tasks import load_task
    examples = list(load_task(config.data.task, **options))
  elif e.split in ("held_out", "train"):
    train, held_out = task_loading.load_examples(config)
    examples = held_out if e.split == "held_out" else train
  else:
    raise ValueError(f"config.evaluate.split must be 'held_out', 'train' or 'all', got {e.split!r}")
  return examples[:e.num_items] if e.num_items else examples


def evaluate(config) -> tuple[EvaluationSummary, list[ItemResult], EvaluationPaths]:
  e, ev = config.evaluate, config.eval
  start = time.perf_counter()
  graphdef, params, tokenizer, description = load_model(
      config, e.checkpoint, which=e.params, step=e.step if e.step >= 0 else None)
  examples = eval_examples(config)
  if not examples:
    raise ValueError("config.evaluate: no items to evaluate")
  # As the trainer does: a prompt over data.max_prompt_len goes now, not mid-run in the sampler.
  examples, dropped = task_loading.drop_overlong_prompts(config, tokenizer, examples, None, "evaluation")
  if dropped:
    print(f"[evaluate] {dropped} of {dropped + len(examples)} prompts over data.max_prompt_len="
          f"{config_lib.max_prompt_len(config)} tokens filtered out", file=sys.stderr)
  ks = tuple(e.ks) or default_ks(ev.num_samples)
  if max(ks) > ev.num_samples:
    raise ValueError(f"config.evaluate.ks: pass@{max(ks)} needs eval.num_samples >= {max(ks)}")
  run = make_sampler_run(config, graphdef, params, tokenizer)
  bar = ProgressBar("evaluate", e.progress)
  groups = rollouts.sample_groups(
      run, examples, jax.random.key(e.seed), num_samples=ev.num_samples, temperature=ev.temperature,
      top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, batch_prompts=ev.batch_prompts, fold_in_start=True,
      progress=bar)
  bar.close()
  summary, items = summarize(
      groups, ks, checkpoint=description, task=_task_name(config), temperature=ev.temperature,
      max_new_tokens=ev.max_new_tokens, seconds=time.perf_counter() - start, top_p=ev.top_p)
  out_dir = e.out_dir or os.path.join("runs", f"eval-{int(time.time())}")
  return summary, items, write_results(out_dir, summary, items)


def _task_name(config) -> str:
  dataset = dict(config.data.options).get("dataset")
  return f"{config.data.task}/{dataset}" if dataset else config.data.task


# -------------------------------------------------------------------------------- CLI


def _apply_flags(config, flags) -> None:
  """Shortcut flags override the config (applied after --config.* overrides)."""
  import ml_collections

  with config.unlocked():
    if "evaluate" not in config:  # a training config: add the evaluate section's defaults
      from configs import evaluate as evaluate_config
      config.evaluate = evaluate_config.evaluate_section()
    if flags.checkpoint:
      config.evaluate.checkpoint = flags.checkpoint
    if flags.task and flags.task != config.data.task:
      # Another task: the config's task options belong to the old one.
      config.data.task = flags.task
      config.data.options = ml_collections.ConfigDict({}, type_safe=False)
    if flags.task_options:
      config.data.options = ml_collections.ConfigDict(json.loads(flags.task_options), type_safe=False)
    if flags.k:
      config.eval.num_samples = flags.k
    if flags.num_items:
      config.evaluate.num_items = flags.num_items
    if flags.split:
      config.evaluate.split = flags.split
    if flags.out:
      config.evaluate.out_dir = flags.out


def run() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  import configs

  default = os.path.join(os.path.dirname(configs.__file__), "evaluate.py")
  config = config_flags.DEFINE_config_file("config", default, "Evaluation configuration (a get_config file).",
                                           lock_config=False)
  flags.DEFINE_string("checkpoint", "", "GGUF / HF dir / 'smollm2-gguf' / orbax run or params dir.")
  flags.DEFINE_string("task", "", "Task name (mopd_jax.tasks registry); resets config.data.options.")
  flags.DEFINE_string("task_options", "", "JSON object of task options, e.g. '{\"dataset\": \"countdown\"}'.")
  flags.DEFINE_integer("k", 0, "Samples per item (config.eval.num_samples).")
  flags.DEFINE_integer("num_items", 0, "Items to evaluate (config.evaluate.num_items).")
  flags.DEFINE_string("split", "", "held_out | train | all (config.evaluate.split).")
  flags.DEFINE_string("out", "", "Output directory (config.evaluate.out_dir).")

  def main(argv) -> None:
    del argv
    quiet_library_logs()
    cfg = config.value
    _apply_flags(cfg, flags.FLAGS)
    summary, _, paths = evaluate(cfg)
    print(markdown_summary(summary))
    print(f"[evaluate] wrote {paths.items}, {paths.json}, {paths.markdown}")

  app.run(main)


if __name__ == "__main__":
  run()
