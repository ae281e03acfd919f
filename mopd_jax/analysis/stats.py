"""Per-prompt agreement between teacher scores and verifier rewards (spec section 6).

Everything here is host-side numpy on small arrays: one prompt has G responses
(G ~ 8-16), so the O(G^2) pairwise forms are both the clearest and fast enough.

Conventions:
- A higher teacher score means the teacher predicts a better response.
- Undefined statistics (constant input, no pair to compare, one outcome class
  only) are NaN, never an exception; aggregation skips them and reports how
  many prompts contributed.
- scipy is only a test reference; the library imports numpy alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

# Order used by summaries, tables and plots.
METRICS: tuple[str, ...] = (
    "spearman",
    "kendall_tau_b",
    "pairwise_accuracy",
    "success_auc",
    "top1_hit",
    "point_biserial",
)
# "all": every prompt; "mixed": prompts with at least one success and one failure.
SUBSETS: tuple[str, ...] = ("all", "mixed")


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True, eq=False)
class PromptRecord:
  """One prompt under one teacher condition: G responses, each scored and judged.

  `prompt_lengths` is the teacher prompt length (tokens) used to score each
  response; it differs between responses when the context holds their peers.
  """

  scores: np.ndarray  # [G] float, teacher score (e.g. sum of response log-probs)
  rewards: np.ndarray  # [G] float, verifier reward
  successes: np.ndarray  # [G] bool, verifier success
  prompt_lengths: np.ndarray | None = None  # [G] teacher prompt lengths, optional

  def __post_init__(self):
    # Frozen: normalise through object.__setattr__ once, then validate.
    object.__setattr__(self, "scores", np.asarray(self.scores, np.float64))
    object.__setattr__(self, "rewards", np.asarray(self.rewards, np.float64))
    object.__setattr__(self, "successes", np.asarray(self.successes, bool))
    if self.prompt_lengths is not None:
      object.__setattr__(self, "prompt_lengths", np.asarray(self.prompt_lengths, np.float64))
    n = self.scores.shape
    if len(n) != 1 or n[0] < 1:
      raise ValueError(f"PromptRecord.scores must be 1-D and non-empty, got shape {n}")
    for name in ("rewards", "successes", "prompt_lengths"):
      value = getattr(self, name)
      if value is not None and value.shape != n:
        raise ValueError(f"PromptRecord.{name} has shape {value.shape}, scores has {n}")
    # A NaN score would silently become "undefined"; a caller bug should fail loudly.
    if not np.all(np.isfinite(self.scores)):
      raise ValueError("PromptRecord.scores must be finite")
    if not np.all(np.isfinite(self.rewards)):
      raise ValueError("PromptRecord.rewards must be finite")

  @classmethod
  def coerce(cls, item: PromptRecord | Sequence) -> PromptRecord:
    """Accepts a record or a tuple (scores, rewards, successes[, prompt_lengths])."""
    if isinstance(item, cls):
      return item
    if len(item) not in (3, 4):
      raise ValueError(
          "expected (scores, rewards, successes[, prompt_lengths]), got a sequence of "
          f"length {len(item)}")
    return cls(*item)


# ------------------------------------------------------------------ per-prompt metrics


def _vec(x) -> np.ndarray:
  return np.asarray(x, np.float64).reshape(-1)


def _is_constant(x: np.ndarray) -> bool:
  # Explicit check: a float mean of equal values can differ from them by an ulp.
  return x.size == 0 or bool(np.all(x == x[0]))


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"inputs differ in length: {a.shape} vs {b.shape}")


def rankdata(x) -> np.ndarray:
  """Ranks 1..n, ties get the average of the ranks they span (scipy 'average')."""
  x = _vec(x)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return (ends - (counts - 1) / 2.0)[inverse]


def pearson(x, y) -> float:
  """Pearson correlation; NaN when either input is constant, non-finite or has < 2 values."""
  x, y = _vec(x), _vec(y)
  _check_same_length(x, y)
  if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    return math.nan
  if _is_constant(x) or _is_constant(y):
    return math.nan
  dx, dy = x - x.mean(), y - y.mean()
  r = np.dot(dx, dy) / math.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
  return float(np.clip(r, -1.0, 1.0))  # rounding can step just outside [-1, 1]


def spearman(scores, rewards) -> float:
  """Spearman rho: Pearson on average ranks (ties handled as scipy.stats.spearmanr)."""
  return pearson(rankdata(scores), rankdata(rewards))


def _pair_signs(x: np.ndarray) -> np.ndarray:
  """sign(x_i - x_j) for pairs i < j, flattened."""
  i, j = np.triu_indices(x.size, k=1)
  return np.sign(x[i] - x[j])


def kendall_tau_b(scores, rewards) -> float:
  """Kendall tau-b: (C - D) / sqrt((n0 - n1)(n0 - n2)), ties in either input allowed.

  n0 - n1 is the number of pairs untied in the scores, n0 - n2 untied in the
  rewards; NaN when either input is constant.
  """
  x, y = _vec(scores), _vec(rewards)
  _check_same_length(x, y)
  sx, sy = _pair_signs(x), _pair_signs(y)
  untied_x, untied_y = np.abs(sx).sum(), np.abs(sy).sum()
  if untied_x == 0 or untied_y == 0:
    return math.nan
  tau = (sx * sy).sum() / math.sqrt(untied_x * untied_y)
  return float(np.clip(tau, -1.0, 1.0))


def pairwise_accuracy(scores, rewards) -> float:
  """Fraction of reward-distinct pairs that the scores order the same way.

  Only pairs with different rewards count; a score tie on such a pair counts
  0.5 (a coin flip). NaN when all rewards are equal.
  """
  x, y = _vec(scores), _vec(rewards)
  _check_same_length(x, y)
  sx, sy = _pair_signs(x), _pair_signs(y)
  keep = sy != 0
  if not np.any(keep):
    return math.nan
  # sx * sy is +1 (agree), -1 (disagree) or 0 (score tie) -> 1, 0, 0.5.
  return float(np.mean((sx[keep] * sy[keep] + 1.0) / 2.0))


def success_auc(scores, successes) -> float:
  """P(score of a success > score of a failure), ties 0.5 (Mann-Whitney U / (n1 n0)).

  NaN unless there is at least one success and one failure.
  """
  x = _vec(scores)
  s = np.asarray(successes, bool).reshape(-1)
  _check_same_length(x, s.astype(np.float64))
  pos, neg = x[s], x[~s]
  if pos.size == 0 or neg.size == 0:
    return math.nan
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def top1_hit(scores, successes) -> float:
  """Is the highest-scored response a success?

  Ties for the top score are broken uniformly at random *in expectation*: the
  result is the fraction of successes among the tied top responses, so it is
  deterministic, in [0, 1], and unbiased for a random tie-break. Defined on every
  prompt (0 when all fail, 1 when all succeed).
  """
  x = _vec(scores)
  s = np.asarray(successes, bool).reshape(-1)
  _check_same_length(x, s.astype(np.float64))
  if x.size == 0:
    return math.nan
  top = x == x.max()
  return float(s[top].mean())


def point_biserial(scores, successes) -> float:
  """Pearson correlation between scores and 0/1 success labels."""
  return pearson(scores, np.asarray(successes, np.float64))


@dataclasses.dataclass(frozen=True)
class PromptStats:
  """All section-6 statistics of one prompt under one teacher condition.

  `pairwise_accuracy` and `success_auc` are NaN unless the prompt has both a
  success and a failure (the spec defines them only there).
  """

  n_responses: int
  n_success: int
  mean_prompt_length: float  # mean teacher prompt length over responses; NaN if unknown
  spearman: float
  kendall_tau_b: float
  pairwise_accuracy: float
  success_auc: float
  top1_hit: float
  point_biserial: float

  @property
  def has_both_outcomes(self) -> bool:
    return 0 < self.n_success < self.n_responses

  def metric(self, name: str) -> float:
    if name not in METRICS:
      raise KeyError(f"unknown metric {name!r}; known: {METRICS}")
    return getattr(self, name)


def prompt_stats(record: PromptRecord | Sequence) -> PromptStats:
  """Computes every metric for one prompt (scores vs rewards / success labels)."""
  r = PromptRecord.coerce(record)
  n_success = int(r.successes.sum())
  mixed = 0 < n_success < r.scores.size
  length = math.nan if r.prompt_lengths is None else float(r.prompt_lengths.mean())
  return PromptStats(
      n_responses=int(r.scores.size),
      n_success=n_success,
      mean_prompt_length=length,
      spearman=spearman(r.scores, r.rewards),
      kendall_tau_b=kendall_tau_b(r.scores, r.rewards),
      # Restricted to mixed prompts by the spec, even for graded rewards.
      pairwise_accuracy=pairwise_accuracy(r.scores, r.rewards) if mixed else math.nan,
      success_auc=success_auc(r.scores, r.successes),
      top1_hit=top1_hit(r.scores, r.successes),
      point_biserial=point_biserial(r.scores, r.successes),
  )


# ----------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class MeanCI:
  """Mean over prompts with a percentile bootstrap interval.

  `n` is how many prompts had a defined (finite) value; all fields are NaN when
  n == 0.
  """

  mean: float
  lo: float
  hi: float
  n: int


def bootstrap_mean_ci(
    values,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MeanCI:
  """Mean of the finite values and a percentile bootstrap CI over them.

  Resampling uses `np.random.default_rng(seed)` afresh on every call, so the
  interval is a pure function of (values, n_resamples, confidence, seed); two
  metrics defined on the same prompts are resampled with the same indices.
  """
  if n_resamples < 1:
    raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  v = _vec(values)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return MeanCI(math.nan, math.nan, math.nan, 0)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, v.size, size=(n_resamples, v.size))
  means = v[idx].mean(axis=1)
  alpha = 1.0 - confidence
  lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
  return MeanCI(float(v.mean()), float(lo), float(hi), int(v.size))


def paired_difference_ci(
    a: Sequence[PromptStats],
    b: Sequence[PromptStats],
    metric: str,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MeanCI:
  """Mean of (a - b) per prompt with a bootstrap CI: compares two conditions.

  `a` and `b` must list the same prompts in the same order (the frozen rollouts
  scored under two contexts). Pairing removes between-prompt variance, so this is
  the right test of "condition A aligns better than B"; overlapping marginal
  intervals are not.
  """
  if len(a) != len(b):
    raise ValueError(f"paired comparison needs the same prompts: {len(a)} vs {len(b)}")
  diff = [x.metric(metric) - y.metric(metric) for x, y in zip(a, b)]
  return bootstrap_mean_ci(diff, n_resamples=n_resamples, confidence=confidence, seed=seed)


@dataclasses.dataclass(frozen=True)
class SubsetSummary:
  """Metrics averaged over one subset of prompts ("all" or "mixed")."""

  n_prompts: int
  mean_prompt_length: float  # mean over the subset's prompts; NaN if unknown
  metrics: Mapping[str, MeanCI]  # keyed by METRICS, in that order


@dataclasses.dataclass(frozen=True)
class ConditionSummary:
  """One teacher condition: per-prompt statistics and their two summaries."""

  condition: str
  all: SubsetSummary  # every prompt
  mixed: SubsetSummary  # prompts with at least one success and one failure
  prompts: tuple[PromptStats, ...]

  def subset(self, name: str) -> SubsetSummary:
    if name not in SUBSETS:
      raise KeyError(f"unknown subset {name!r}; known: {SUBSETS}")
    return getattr(self, name)


def _nanmean(values: Sequence[float]) -> float:
  v = _vec(values)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else math.nan


def summarize_subset(
    stats: Sequence[PromptStats],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SubsetSummary:
  """Mean and bootstrap CI of every metric over the given prompts."""
  metrics = {
      m: bootstrap_mean_ci(
          [s.metric(m) for s in stats],
          n_resamples=n_resamples, confidence=confidence, seed=seed)
      for m in METRICS
  }
  return SubsetSummary(
      n_prompts=len(stats),
      mean_prompt_length=_nanmean([s.mean_prompt_length for s in stats]),
      metrics=metrics,
  )


def summarize_condition(
    condition: str,
    records: Sequence[PromptRecord | Sequence],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConditionSummary:
  """Per-prompt statistics of one condition, summarised over all and mixed prompts."""
  stats = tuple(prompt_stats(r) for r in records)
  kw = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
  return ConditionSummary(
      condition=condition,
      all=summarize_subset(stats, **kw),
      mixed=summarize_subset([s for s in stats if s.has_both_outcomes], **kw),
      prompts=stats,
  )
