"""Diversity metrics on hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mopd_jax import diversity as dv


def test_distinct_n_hand_example():
  group = ["a b a", "a b c"]
  # unigrams: a b a a b c -> 3 distinct of 6; bigrams: ab ba ab bc -> 3 of 4;
  # trigrams: aba abc -> 2 of 2; no 4-grams.
  assert dv.distinct_n(group, 1) == 0.5
  assert dv.distinct_n(group, 2) == 0.75
  assert dv.distinct_n(group, 3) == 1.0
  assert math.isnan(dv.distinct_n(group, 4))


def test_token_ids_and_strings_agree():
  words = ["x y z x", "y z"]
  ids = [np.array([1, 2, 3, 1]), [2, 3]]
  assert dv.group_diversity(words) == dv.group_diversity(ids)


def test_jaccard_hand_example():
  # bigrams {ab, bc} vs {ab, bd}: 1 shared of 3.
  assert dv.jaccard_similarity("a b c", "a b d", n=2) == pytest.approx(1 / 3)
  assert dv.jaccard_similarity("a b c", "a b d", n=1) == pytest.approx(2 / 4)
  assert dv.jaccard_similarity("a", "a", n=2) == 1.0  # no bigrams: fall back to equality
  assert dv.jaccard_similarity("a", "b", n=2) == 0.0


def test_edit_similarity_hand_example():
  # 2 matched tokens out of 3 + 3.
  assert dv.edit_similarity("a b c", "a x c") == pytest.approx(4 / 6)
  assert dv.edit_similarity([1, 2, 3], [1, 2, 3]) == 1.0
  assert dv.edit_similarity("", "") == 1.0
  # Long repetitive sequences: autojunk off keeps the exact ratio.
  a, b = [7] * 300, [7] * 299 + [8]
  assert dv.edit_similarity(a, b) == pytest.approx(2 * 299 / 600)


def test_group_and_mean_diversity():
  same = ["a b c d"] * 3
  d = dv.group_diversity(same)
  assert d.n_groups == 1
  assert d.distinct_1 == pytest.approx(4 / 12)
  assert d.jaccard_similarity == 1.0 and d.edit_similarity == 1.0
  different = ["a b", "c d", "e f"]
  e = dv.group_diversity(different)
  assert e.distinct_1 == 1.0 and e.distinct_2 == 1.0
  assert math.isnan(e.distinct_3)
  assert e.jaccard_similarity == 0.0 and e.edit_similarity == 0.0
  m = dv.mean_diversity([same, different])
  assert m.n_groups == 2
  assert m.distinct_1 == pytest.approx((4 / 12 + 1.0) / 2)
  assert m.distinct_3 == pytest.approx(d.distinct_3)  # the NaN group is skipped
  assert m.jaccard_similarity == pytest.approx(0.5)


def test_single_response_has_no_pairwise_similarity():
  d = dv.group_diversity(["only one"])
  assert math.isnan(d.jaccard_similarity) and math.isnan(d.edit_similarity)
  assert d.distinct_1 == 1.0
