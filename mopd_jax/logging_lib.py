"""Run logging: JSONL metrics, TensorBoard events, a progress bar, and readable rollout dumps."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

HEADLINE = ("rollout/success_rate", "loss", "teacher_alignment_auc", "time/step_s")


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
  """Typed metric dataclasses (nested) -> {"name": float}; the method's own under `method/`."""
  out: dict[str, float] = {}
  for field in dataclasses.fields(metrics):
    value = getattr(metrics, field.name)
    key = prefix + field.name
    if dataclasses.is_dataclass(value):
      out.update(flatten_metrics(value, prefix=f"{field.name}/"))
    elif value is not None:
      out[key] = float(np.asarray(value))
  return out


def quiet_library_logs() -> None:
  """Library INFO logs (orbax's ~30 lines per checkpoint, absl's) off, warnings on, unless the
  command line gave absl's --verbosity / -v. Call inside an absl main: app.run sets INFO when
  the flag is absent."""
  from absl import flags
  from absl import logging as absl_logging

  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def _json_safe(x: Any) -> Any:
  return None if isinstance(x, float) and not math.isfinite(x) else x


class MetricsLogger:
  """Writes only on the main process (`enabled`); everything else is a no-op."""

  def __init__(self, directory: str, *, enabled: bool = True, progress: bool = True, total_steps: int = 0):
    self.directory = directory
    self.enabled = enabled
    self._bar = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
    self._rollouts = open(os.path.join(directory, "rollouts.md"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(directory, "tb"))
    except ImportError:  # optional: JSONL still has everything
      self._tb = None
    if progress and total_steps:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, desc="mopd", dynamic_ncols=True, file=sys.stdout)

  def info(self, message: str) -> None:
    if not self.enabled:
      return
    (self._bar.write if self._bar else print)(f"[mopd] {message}")

  def warning(self, message: str) -> None:
    """A condition that makes the run's numbers misleading (e.g. a step that trains on nothing):
    on stderr, so it shows even when stdout is a progress bar or redirected."""
    if not self.enabled:
      return
    line = f"[mopd] WARNING: {message}"
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)

  def log(self, step: int, record: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": step, "wall_time": time.time(), **{k: _json_safe(float(v)) for k, v in record.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(k, float(v), step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3g}" for k in HEADLINE if k in record})
    else:
      shown = ", ".join(f"{k}={record[k]:.4g}" for k in HEADLINE if k in record)
      print(f"[mopd] step {step}: {shown}", flush=True)

  def log_eval(self, step: int, result: Any, tag: str) -> None:
    if not self.enabled:
      return
    record = {f"eval/mean_at_{result.k}": result.mean_at_k, f"eval/pass_at_{result.k}": result.pass_at_k}
    self.info(f"eval ({tag}, step {step}): mean@{result.k} = {100 * result.mean_at_k:.1f}%, "
              f"pass@{result.k} = {100 * result.pass_at_k:.1f}% on {result.num_prompts} held-out prompts")
    row = {"step": step, "tag": tag, **record}
    with open(os.path.join(self.directory, "eval.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    with open(os.path.join(self.directory, f"eval_items_step{step}_{tag}.json"), "w") as f:
      json.dump([list(map(bool, s)) for s in result.per_item_success], f)
    if self._tb is not None:
      for k, v in record.items():
        self._tb.add_scalar(k, v, step)

  def write_rollouts(self, step: int, groups: Any, count: int) -> None:
    """The first `count` rollouts (`rollouts.RolloutGroup`s with teacher contexts) with their
    verdicts and teacher contexts, for reading."""
    if not self.enabled:
      return
    lines = [f"\n## step {step}\n"]
    shown = [(p, g, i) for p, g in enumerate(groups) for i in range(len(g))][:count]
    for r, (p, group, i) in enumerate(shown):
      ctx, v = group.contexts[i], group.verdicts()[i]
      lines.append(f"### rollout {r} (prompt {p}): reward {v.reward:.2f}, success {v.success}, "
                   f"distill_mask {ctx.distill_mask}, sections {list(ctx.kinds)}\n")
      lines.append("**response**\n\n```\n" + group.responses[i] + "\n```\n")
      if v.feedback:
        lines.append(f"**feedback**: {v.feedback[:500]}\n")
      teacher_user = ctx.messages[-1].content
      lines.append("**teacher context (last message)**\n\n```\n" + teacher_user[:4000] + "\n```\n")
    self._rollouts.write("\n".join(lines))
    self._rollouts.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
    self._rollouts.close()
