"""Diversity of a group's solutions: distinct-n and mean pairwise similarity.

A response is either a string (split on whitespace) or a sequence of token ids.
All metrics are in [0, 1]; distinct-n is higher for more diverse groups, the
similarities are higher for *less* diverse groups. Undefined values are NaN
(no n-grams at all; fewer than two responses for a pairwise mean).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from typing import Hashable, Sequence, Union

import numpy as np

Response = Union[str, Sequence[int], np.ndarray]
DISTINCT_ORDERS: tuple[int, ...] = (1, 2, 3, 4)


def to_tokens(response: Response) -> tuple[Hashable, ...]:
  """Whitespace tokens of a string, or the elements of a token sequence (idempotent)."""
  if isinstance(response, str):
    return tuple(response.split())
  if isinstance(response, np.ndarray):
    return tuple(response.reshape(-1).tolist())  # python ints: hashable, compare by value
  return tuple(response)


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
  if n < 1:
    raise ValueError(f"n-gram order must be >= 1, got {n}")
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(group: Sequence[Response], n: int) -> float:
  """Distinct n-grams / total n-grams, pooled over the group (Li et al., 2016)."""
  grams = [g for r in group for g in ngrams(to_tokens(r), n)]
  return len(set(grams)) / len(grams) if grams else math.nan


def jaccard_similarity(a: Response, b: Response, n: int = 2) -> float:
  """|A & B| / |A | B| of the two responses' n-gram sets.

  When neither has an n-gram (both shorter than n) the sets say nothing, so the
  similarity falls back to token equality: 1.0 if identical, else 0.0.
  """
  ta, tb = to_tokens(a), to_tokens(b)
  ga, gb = set(ngrams(ta, n)), set(ngrams(tb, n))
  union = ga | gb
  if not union:
    return 1.0 if ta == tb else 0.0
  return len(ga & gb) / len(union)


def edit_similarity(a: Response, b: Response) -> float:
  """difflib ratio 2M / (|a| + |b|) over tokens (M = matched tokens); 1.0 if identical.

  autojunk is off: difflib's heuristic would otherwise ignore frequent tokens in
  sequences of 200+ tokens and change the score. Cost is about quadratic in length.
  """
  return difflib.SequenceMatcher(None, to_tokens(a), to_tokens(b), autojunk=False).ratio()


def _mean_pairwise(group: Sequence[Response], fn) -> float:
  pairs = list(itertools.combinations(group, 2))
  return float(np.mean([fn(a, b) for a, b in pairs])) if pairs else math.nan


@dataclasses.dataclass(frozen=True)
class Diversity:
  """Diversity of one group, or the mean over groups (then `n_groups` > 1).

  Averages skip groups where a metric is undefined (NaN).
  """

  n_groups: int
  distinct_1: float
  distinct_2: float
  distinct_3: float
  distinct_4: float
  jaccard_similarity: float  # mean pairwise Jaccard of `jaccard_n`-gram sets
  edit_similarity: float  # mean pairwise difflib ratio
  jaccard_n: int


_DIVERSITY_METRICS: tuple[str, ...] = (
    "distinct_1", "distinct_2", "distinct_3", "distinct_4", "jaccard_similarity",
    "edit_similarity")


def group_diversity(group: Sequence[Response], *, jaccard_n: int = 2) -> Diversity:
  """All diversity metrics of one group of responses (one prompt's rollouts)."""
  tokens = [to_tokens(r) for r in group]  # tokenise once for every metric
  d1, d2, d3, d4 = (distinct_n(tokens, n) for n in DISTINCT_ORDERS)
  return Diversity(
      n_groups=1,
      distinct_1=d1, distinct_2=d2, distinct_3=d3, distinct_4=d4,
      jaccard_similarity=_mean_pairwise(tokens, lambda a, b: jaccard_similarity(a, b, jaccard_n)),
      edit_similarity=_mean_pairwise(tokens, edit_similarity),
      jaccard_n=jaccard_n,
  )


def mean_diversity(groups: Sequence[Sequence[Response]], *, jaccard_n: int = 2) -> Diversity:
  """Per-group diversity averaged over groups (each group weighs the same)."""
  per_group = [group_diversity(g, jaccard_n=jaccard_n) for g in groups]

  def avg(name: str) -> float:
    v = np.array([getattr(d, name) for d in per_group], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan

  return Diversity(
      n_groups=len(per_group), jaccard_n=jaccard_n,
      **{name: avg(name) for name in _DIVERSITY_METRICS})
