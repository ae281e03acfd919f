"""pass@k against brute-force enumeration of k-subsets; mean@k; validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mopd_jax import passk


def _brute_force(n: int, c: int, k: int) -> float:
  outcomes = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(outcomes, k))
  return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert passk.pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
  # Exact rational reference; the binomials themselves overflow float64.
  n, c, k = 2000, 3, 500
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert passk.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
  assert passk.pass_at_k(n, 0, k) == 0.0
  assert passk.pass_at_k(1, 1, 1) == 1.0


def test_pass_at_1_is_success_rate():
  assert passk.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
  with pytest.raises(ValueError):
    passk.pass_at_k(n, c, k)


def test_aggregate():
  items = [[True, False, False, False], [False] * 4, [True] * 3 + [False] * 5]
  res = passk.aggregate_pass_at_k(items, ks=(1, 2, 4))
  assert [r.k for r in res] == [1, 2, 4]
  for r in res:
    expected = np.mean([_brute_force(len(s), sum(s), r.k) for s in items])
    assert r.pass_at_k == pytest.approx(expected)
    assert r.mean_at_k == pytest.approx(np.mean([0.25, 0.0, 3 / 8]))
    assert r.n_items == 3
  graded = passk.aggregate_pass_at_k([[True, False]], ks=(1,), rewards=[[1.0, 0.5]])
  assert graded[0].mean_at_k == 0.75 and graded[0].pass_at_k == 0.5


def test_aggregate_rejects_short_items():
  with pytest.raises(ValueError, match="pass@4"):
    passk.aggregate_pass_at_k([[True] * 4, [True] * 2], ks=(4,))
  with pytest.raises(ValueError, match="rewards"):
    passk.aggregate_pass_at_k([[True, False]], rewards=[[1.0]])
