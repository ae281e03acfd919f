"""pass@k and mean@k from n sampled completions per item.

pass@k is the unbiased estimator of Chen et al. (2021, Codex):
  pass@k = 1 - C(n - c, k) / C(n, k),
computed as a running product so that large n never forms huge binomials.
mean@k is the expected mean reward (or success rate) of k samples; its unbiased
estimate from n >= k samples is the mean over all n (independent of k), which
is what the paper's "mean@8" reports when n = 8.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples, drawn without replacement from n
  samples with c correct, is correct."""
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:
    return 1.0  # every k-subset contains a correct sample
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class PassAtK:
  """pass@k and mean@k averaged over items (each item weighs the same)."""

  k: int
  pass_at_k: float
  mean_at_k: float
  n_items: int


def aggregate_pass_at_k(
    successes: Sequence[Sequence[bool]],
    ks: Sequence[int] = (1,),
    rewards: Sequence[Sequence[float]] | None = None,
) -> tuple[PassAtK, ...]:
  """pass@k (from success labels) and mean@k over items, for each k in ks.

  `successes[i]` holds item i's n_i sample outcomes; n_i may differ between items
  but must be >= max(ks). mean@k averages `rewards` when given (graded tasks),
  else the success labels.
  """
  if not successes:
    raise ValueError("aggregate_pass_at_k needs at least one item")
  outcomes = [np.asarray(s, bool).reshape(-1) for s in successes]
  values = outcomes if rewards is None else [np.asarray(r, np.float64).reshape(-1) for r in rewards]
  if len(values) != len(outcomes):
    raise ValueError(f"{len(values)} reward rows for {len(outcomes)} items")
  for i, (s, v) in enumerate(zip(outcomes, values)):
    if s.shape != v.shape:
      raise ValueError(f"item {i}: {s.size} success labels but {v.size} rewards")
  mean_at = float(np.mean([v.mean() for v in values]))
  results = []
  for k in ks:
    short = [i for i, s in enumerate(outcomes) if s.size < k]
    if short:
      raise ValueError(f"pass@{k} needs >= {k} samples per item; items {short[:5]} have fewer")
    per_item = [pass_at_k(s.size, int(s.sum()), k) for s in outcomes]
    results.append(PassAtK(k=int(k), pass_at_k=float(np.mean(per_item)), mean_at_k=mean_at,
                           n_items=len(outcomes)))
  return tuple(results)
