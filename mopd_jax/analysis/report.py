"""Teacher-signal report: summaries of several teacher conditions as JSON, markdown, PNG.

Input: condition name -> per-prompt records (scores, rewards, successes,
prompt_lengths), the same frozen rollouts scored under each teacher context.
Output of `write_report(summary, out_dir)`:
  summary.json                 everything, per-prompt statistics included (NaN -> null)
  summary.md                   one table per prompt subset (all / mixed)
  bars_<metric>.png            per-condition bars with bootstrap CI error bars
  confound_prompt_length.png   metric vs mean teacher prompt length, per condition

matplotlib is imported lazily and used through its object API with the Agg
canvas, so writing a report never touches the caller's pyplot backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from mopd_jax.analysis import stats as st

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AnalysisSummary:
  """All conditions of one analysis, plus how the intervals were computed."""

  conditions: tuple[st.ConditionSummary, ...]
  n_resamples: int
  confidence: float
  seed: int

  def condition(self, name: str) -> st.ConditionSummary:
    for c in self.conditions:
      if c.condition == name:
        return c
    raise KeyError(f"unknown condition {name!r}; known: {[c.condition for c in self.conditions]}")


@dataclasses.dataclass(frozen=True)
class ReportPaths:
  json: pathlib.Path
  markdown: pathlib.Path
  bar_plots: tuple[pathlib.Path, ...]  # one per metric, in st.METRICS order
  confound_plot: pathlib.Path


def summarize_conditions(
    conditions: Mapping[str, Sequence[st.PromptRecord | Sequence]],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AnalysisSummary:
  """Per-prompt statistics and bootstrap summaries for every condition (insertion order).

  Each condition is bootstrapped with the same seed, so conditions over the same
  prompts share resampling indices wherever their defined-prompt sets coincide.
  """
  if not conditions:
    raise ValueError("summarize_conditions needs at least one condition")
  kw = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
  summaries = tuple(st.summarize_condition(name, recs, **kw) for name, recs in conditions.items())
  return AnalysisSummary(conditions=summaries, **kw)


# ---------------------------------------------------------------------------- JSON


def _num(x: float) -> float | None:
  # Strict JSON has no NaN; null marks "undefined".
  return None if x is None or not math.isfinite(x) else float(x)


def _unnum(x: float | None) -> float:
  return math.nan if x is None else float(x)


def _mean_ci_to_dict(m: st.MeanCI) -> dict[str, Any]:
  return {"mean": _num(m.mean), "lo": _num(m.lo), "hi": _num(m.hi), "n": m.n}


def _subset_to_dict(s: st.SubsetSummary) -> dict[str, Any]:
  return {
      "n_prompts": s.n_prompts,
      "mean_prompt_length": _num(s.mean_prompt_length),
      "metrics": {k: _mean_ci_to_dict(v) for k, v in s.metrics.items()},
  }


# PromptStats fields that are counts; every other field is a float.
_PROMPT_INT_FIELDS = ("n_responses", "n_success")


def _prompt_to_dict(p: st.PromptStats) -> dict[str, Any]:
  return {
      f.name: (getattr(p, f.name) if f.name in _PROMPT_INT_FIELDS else _num(getattr(p, f.name)))
      for f in dataclasses.fields(p)
  }


def summary_to_dict(summary: AnalysisSummary) -> dict[str, Any]:
  """A JSON-ready dict (NaN written as None)."""
  return {
      "schema_version": SCHEMA_VERSION,
      "n_resamples": summary.n_resamples,
      "confidence": summary.confidence,
      "seed": summary.seed,
      "metrics": list(st.METRICS),
      "conditions": [
          {
              "condition": c.condition,
              "all": _subset_to_dict(c.all),
              "mixed": _subset_to_dict(c.mixed),
              "prompts": [_prompt_to_dict(p) for p in c.prompts],
          }
          for c in summary.conditions
      ],
  }


def _subset_from_dict(d: Mapping[str, Any]) -> st.SubsetSummary:
  return st.SubsetSummary(
      n_prompts=int(d["n_prompts"]),
      mean_prompt_length=_unnum(d["mean_prompt_length"]),
      metrics={
          k: st.MeanCI(_unnum(v["mean"]), _unnum(v["lo"]), _unnum(v["hi"]), int(v["n"]))
          for k, v in d["metrics"].items()
      },
  )


def _prompt_from_dict(d: Mapping[str, Any]) -> st.PromptStats:
  kwargs = {
      f.name: (int(d[f.name]) if f.name in _PROMPT_INT_FIELDS else _unnum(d[f.name]))
      for f in dataclasses.fields(st.PromptStats)
  }
  return st.PromptStats(**kwargs)


def summary_from_dict(d: Mapping[str, Any]) -> AnalysisSummary:
  """Inverse of `summary_to_dict` (None read back as NaN)."""
  if d.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"unsupported summary schema_version {d.get('schema_version')!r}")
  return AnalysisSummary(
      conditions=tuple(
          st.ConditionSummary(
              condition=c["condition"],
              all=_subset_from_dict(c["all"]),
              mixed=_subset_from_dict(c["mixed"]),
              prompts=tuple(_prompt_from_dict(p) for p in c["prompts"]),
          )
          for c in d["conditions"]
      ),
      n_resamples=int(d["n_resamples"]),
      confidence=float(d["confidence"]),
      seed=int(d["seed"]),
  )


def load_summary(path: str | pathlib.Path) -> AnalysisSummary:
  return summary_from_dict(json.loads(pathlib.Path(path).read_text()))


# ------------------------------------------------------------------------ markdown


def _fmt_ci(m: st.MeanCI) -> str:
  if m.n == 0:
    return "n/a"
  return f"{m.mean:.3f} [{m.lo:.3f}, {m.hi:.3f}] (n={m.n})"


def _fmt_len(x: float) -> str:
  return "n/a" if not math.isfinite(x) else f"{x:.1f}"


_SUBSET_TITLES = {
    "all": "All prompts",
    "mixed": "Prompts with both a success and a failure",
}


def markdown_report(summary: AnalysisSummary) -> str:
  """One table per subset: rows are conditions, cells are mean [CI] (n prompts defined)."""
  pct = round(100 * summary.confidence)
  lines = [
      "# Teacher-signal analysis",
      "",
      f"Means over prompts with {pct}% percentile bootstrap intervals "
      f"({summary.n_resamples} resamples over prompts, seed {summary.seed}). "
      "`n` counts the prompts where the metric is defined; undefined prompts "
      "(e.g. constant rewards) are left out of that metric's mean. Pairwise accuracy "
      "and success AUC are defined only on prompts with both outcomes.",
  ]
  header = ["condition", "prompts", "mean teacher prompt len", *st.METRICS]
  for subset in st.SUBSETS:
    lines += ["", f"## {_SUBSET_TITLES[subset]}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for c in summary.conditions:
      s = c.subset(subset)
      cells = [c.condition, str(s.n_prompts), _fmt_len(s.mean_prompt_length)]
      cells += [_fmt_ci(s.metrics[m]) for m in st.METRICS]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
  # Object API + Agg canvas: no pyplot global state, no GUI backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _yerr(cis: Sequence[st.MeanCI]) -> np.ndarray:
  mean = np.array([c.mean for c in cis])
  lo = np.array([c.lo for c in cis])
  hi = np.array([c.hi for c in cis])
  # Percentile intervals need not be symmetric; clip guards rounding below 0.
  return np.stack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])


def plot_metric_bars(summary: AnalysisSummary, metric: str, path: pathlib.Path) -> None:
  """Grouped bars: one group per condition, one bar per subset, CI error bars."""
  names = [c.condition for c in summary.conditions]
  x = np.arange(len(names))
  width = 0.8 / len(st.SUBSETS)
  fig = _new_figure(max(6.0, 0.9 * len(names) + 2.0), 4.0)
  ax = fig.add_subplot()
  for i, subset in enumerate(st.SUBSETS):
    cis = [c.subset(subset).metrics[metric] for c in summary.conditions]
    ax.bar(
        x + (i - (len(st.SUBSETS) - 1) / 2) * width,
        [c.mean for c in cis],
        width,
        yerr=_yerr(cis),
        capsize=3,
        label=_SUBSET_TITLES[subset],
    )
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} by teacher condition ({round(100 * summary.confidence)}% CI)")
  ax.axhline(0.5 if metric in ("pairwise_accuracy", "success_auc") else 0.0,
             color="gray", lw=0.8, ls="--")  # chance level
  ax.legend(fontsize="small")
  fig.savefig(path, dpi=120)


def plot_prompt_length_confound(summary: AnalysisSummary, path: pathlib.Path) -> None:
  """Metric vs mean teacher prompt length, one point per condition and subset.

  Richer contexts are also longer; if a metric tracks length across conditions,
  length rather than content may explain the gain. The title gives the Pearson r
  across conditions (mixed prompts).
  """
  n_cols = 3
  n_rows = math.ceil(len(st.METRICS) / n_cols)
  fig = _new_figure(4.2 * n_cols, 3.6 * n_rows)
  axes = fig.subplots(n_rows, n_cols, squeeze=False).reshape(-1)
  markers = {"all": "o", "mixed": "^"}
  for ax, metric in zip(axes, st.METRICS):
    for subset in st.SUBSETS:
      lengths = [c.subset(subset).mean_prompt_length for c in summary.conditions]
      cis = [c.subset(subset).metrics[metric] for c in summary.conditions]
      ax.errorbar(lengths, [c.mean for c in cis], yerr=_yerr(cis), fmt=markers[subset],
                  capsize=3, label=_SUBSET_TITLES[subset])
    for c in summary.conditions:
      m = c.mixed
      if math.isfinite(m.mean_prompt_length) and m.metrics[metric].n:
        ax.annotate(c.condition, (m.mean_prompt_length, m.metrics[metric].mean),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    xy = np.array([(c.mixed.mean_prompt_length, c.mixed.metrics[metric].mean)
                   for c in summary.conditions]).reshape(-1, 2)
    xy = xy[np.all(np.isfinite(xy), axis=1)]  # conditions without lengths or values drop out
    r = st.pearson(xy[:, 0], xy[:, 1])
    ax.set_title(f"{metric} (r vs length = {r:.2f})" if math.isfinite(r) else metric)
    ax.set_xlabel("mean teacher prompt length (tokens)")
    ax.set_ylabel(metric)
  for ax in axes[len(st.METRICS):]:
    ax.set_visible(False)
  axes[0].legend(fontsize="small")
  fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------- writer


def write_report(summary: AnalysisSummary, out_dir: str | pathlib.Path) -> ReportPaths:
  """Writes summary.json, summary.md and the PNG plots into out_dir (created)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = ReportPaths(
      json=out / "summary.json",
      markdown=out / "summary.md",
      bar_plots=tuple(out / f"bars_{m}.png" for m in st.METRICS),
      confound_plot=out / "confound_prompt_length.png",
  )
  paths.json.write_text(json.dumps(summary_to_dict(summary), indent=2, allow_nan=False) + "\n")
  paths.markdown.write_text(markdown_report(summary))
  for metric, path in zip(st.METRICS, paths.bar_plots):
    plot_metric_bars(summary, metric, path)
  plot_prompt_length_confound(summary, paths.confound_plot)
  return paths
