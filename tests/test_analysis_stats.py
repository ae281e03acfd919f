"""Teacher-signal statistics against scipy references; bootstrap; report files."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mopd_jax.analysis import report, stats

scipy_stats = pytest.importorskip("scipy.stats")


def _random_prompt(rng: np.random.Generator, g: int, ties: bool):
  """Scores and graded rewards; rounding makes ties in both when asked."""
  scores = rng.normal(size=g)
  rewards = rng.choice([0.0, 0.25, 0.5, 1.0], size=g)
  if ties:
    scores = np.round(scores, 0)
  successes = rewards >= 1.0
  return scores, rewards, successes


CASES = [(g, ties, seed) for g in (2, 3, 8, 16, 40) for ties in (False, True) for seed in range(6)]


@pytest.mark.parametrize("g,ties,seed", CASES)
def test_correlations_match_scipy(g, ties, seed):
  rng = np.random.default_rng(seed)
  scores, rewards, successes = _random_prompt(rng, g, ties)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy warns on constant input; its NaN is the reference
    ref_rho = scipy_stats.spearmanr(scores, rewards).statistic
    ref_tau = scipy_stats.kendalltau(scores, rewards, variant="b").statistic
    ref_pb = scipy_stats.pointbiserialr(successes, scores).statistic
  np.testing.assert_allclose(stats.spearman(scores, rewards), ref_rho, atol=1e-12, equal_nan=True)
  np.testing.assert_allclose(stats.kendall_tau_b(scores, rewards), ref_tau, atol=1e-12,
                             equal_nan=True)
  np.testing.assert_allclose(stats.point_biserial(scores, successes), ref_pb, atol=1e-12,
                             equal_nan=True)


@pytest.mark.parametrize("g,ties,seed", CASES)
def test_auc_matches_mann_whitney(g, ties, seed):
  rng = np.random.default_rng(100 + seed)
  scores, _, _ = _random_prompt(rng, g, ties)
  successes = rng.random(g) < 0.5
  ours = stats.success_auc(scores, successes)
  pos, neg = scores[successes], scores[~successes]
  if pos.size == 0 or neg.size == 0:
    assert math.isnan(ours)
    return
  u = scipy_stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
  np.testing.assert_allclose(ours, u / (pos.size * neg.size), atol=1e-12)


def _pairwise_accuracy_loop(scores, rewards):
  total, correct = 0, 0.0
  for i, j in itertools.combinations(range(len(scores)), 2):
    if rewards[i] == rewards[j]:
      continue
    total += 1
    ds, dr = scores[i] - scores[j], rewards[i] - rewards[j]
    correct += 0.5 if ds == 0 else float((ds > 0) == (dr > 0))
  return correct / total if total else math.nan


@pytest.mark.parametrize("g,ties,seed", CASES)
def test_pairwise_accuracy_matches_loop(g, ties, seed):
  rng = np.random.default_rng(200 + seed)
  scores, rewards, _ = _random_prompt(rng, g, ties)
  np.testing.assert_allclose(stats.pairwise_accuracy(scores, rewards),
                             _pairwise_accuracy_loop(scores, rewards), equal_nan=True)


def test_pairwise_accuracy_equals_auc_for_binary_rewards():
  rng = np.random.default_rng(3)
  scores = np.round(rng.normal(size=12), 1)
  successes = np.arange(12) % 3 == 0
  assert stats.pairwise_accuracy(scores, successes.astype(float)) == pytest.approx(
      stats.success_auc(scores, successes))


def test_rankdata_matches_scipy():
  x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
  np.testing.assert_array_equal(stats.rankdata(x), scipy_stats.rankdata(x))


def test_top1_hit_and_ties():
  assert stats.top1_hit([0.1, 0.9, 0.3], [False, True, False]) == 1.0
  assert stats.top1_hit([0.1, 0.9, 0.3], [True, False, True]) == 0.0
  # Tie at the top between a success and a failure: expected value of a random pick.
  assert stats.top1_hit([0.9, 0.9, 0.3], [True, False, True]) == 0.5
  assert stats.top1_hit([0.9, 0.9, 0.9, 0.1], [True, True, False, False]) == pytest.approx(2 / 3)


def test_undefined_cases_are_nan():
  const = np.zeros(5)
  varied = np.arange(5.0)
  assert math.isnan(stats.spearman(const, varied))
  assert math.isnan(stats.spearman(varied, const))
  assert math.isnan(stats.kendall_tau_b(const, varied))
  assert math.isnan(stats.kendall_tau_b(varied, const))
  assert math.isnan(stats.pairwise_accuracy(varied, const))
  assert math.isnan(stats.success_auc(varied, np.ones(5, bool)))
  assert math.isnan(stats.point_biserial(varied, np.zeros(5, bool)))
  assert math.isnan(stats.point_biserial(const, varied > 2))
  assert math.isnan(stats.spearman([1.0], [1.0]))
  # Constant floats whose mean is off by an ulp must still count as constant.
  assert math.isnan(stats.pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))


def test_prompt_stats_restricts_pairwise_and_auc_to_mixed_prompts():
  # Graded rewards differ but nothing succeeds: pairwise accuracy is undefined by spec.
  p = stats.prompt_stats(([0.3, 0.2, 0.1], [0.5, 0.2, 0.0], [False, False, False]))
  assert not p.has_both_outcomes
  assert math.isnan(p.pairwise_accuracy) and math.isnan(p.success_auc)
  assert p.spearman == pytest.approx(1.0) and p.top1_hit == 0.0
  q = stats.prompt_stats(([0.3, 0.2, 0.1], [1.0, 0.0, 0.0], [True, False, False], [10, 20, 30]))
  assert q.has_both_outcomes and q.pairwise_accuracy == 1.0 and q.success_auc == 1.0
  assert q.mean_prompt_length == 20.0


def test_prompt_record_validates():
  with pytest.raises(ValueError, match="rewards"):
    stats.PromptRecord([1.0, 2.0], [1.0], [True, False])
  with pytest.raises(ValueError, match="finite"):
    stats.PromptRecord([1.0, np.nan], [1.0, 0.0], [True, False])
  with pytest.raises(ValueError, match="length 2"):
    stats.PromptRecord.coerce(([1.0], [1.0]))


# ------------------------------------------------------------------------- bootstrap


def test_bootstrap_reproducible_and_contains_mean():
  rng = np.random.default_rng(0)
  for trial in range(20):
    values = rng.normal(loc=trial, size=rng.integers(1, 60))
    a = stats.bootstrap_mean_ci(values, seed=7)
    b = stats.bootstrap_mean_ci(values, seed=7)
    assert a == b
    assert a.mean == pytest.approx(values.mean())
    assert a.lo <= a.mean <= a.hi
    assert a.n == values.size
  c = stats.bootstrap_mean_ci(values, seed=8)
  assert (c.lo, c.hi) != (a.lo, a.hi)


def test_bootstrap_skips_nan_and_handles_empty():
  ci = stats.bootstrap_mean_ci([1.0, np.nan, 3.0])
  assert ci.n == 2 and ci.mean == 2.0
  empty = stats.bootstrap_mean_ci([np.nan])
  assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.lo)
  one = stats.bootstrap_mean_ci([0.25])
  assert (one.mean, one.lo, one.hi) == (0.25, 0.25, 0.25)


def test_bootstrap_interval_width_is_plausible():
  # For a normal sample the 95% interval is about mean +- 1.96 * sd / sqrt(n).
  rng = np.random.default_rng(1)
  values = rng.normal(size=400)
  ci = stats.bootstrap_mean_ci(values, n_resamples=2000)
  expected = 2 * 1.96 * values.std(ddof=1) / math.sqrt(values.size)
  assert ci.hi - ci.lo == pytest.approx(expected, rel=0.15)


def test_paired_difference_ci():
  rng = np.random.default_rng(2)
  records = [_random_prompt(rng, 8, False) for _ in range(30)]
  better = [stats.prompt_stats((r + 5 * s, r, s)) for _, r, s in records]
  worse = [stats.prompt_stats((sc, r, s)) for sc, r, s in records]
  diff = stats.paired_difference_ci(better, worse, "spearman")
  assert diff.lo > 0
  with pytest.raises(ValueError, match="same prompts"):
    stats.paired_difference_ci(better, worse[:-1], "spearman")


# ---------------------------------------------------------------------------- report


def _conditions(seed: int = 0, n_prompts: int = 25, g: int = 8):
  """Conditions whose scores track rewards to different degrees; some prompts unmixed."""
  rng = np.random.default_rng(seed)
  rewards = [(rng.random(g) < rng.choice([0.0, 0.3, 0.7, 1.0])).astype(float)
             for _ in range(n_prompts)]
  out = {}
  for name, signal, length in (("base", 0.0, 200), ("solution", 1.0, 900), ("2S1F", 2.0, 1500)):
    out[name] = [
        stats.PromptRecord(rng.normal(size=g) + signal * r, r, r > 0,
                           rng.integers(length - 50, length + 50, size=g))
        for r in rewards
    ]
  # A tuple input and a condition without prompt lengths.
  out["no_lengths"] = [(rng.normal(size=g), r, r > 0) for r in rewards]
  return out


def test_summarize_conditions():
  summary = report.summarize_conditions(_conditions(), n_resamples=200, seed=3)
  assert [c.condition for c in summary.conditions] == ["base", "solution", "2S1F", "no_lengths"]
  base, strong = summary.condition("base"), summary.condition("2S1F")
  assert strong.mixed.metrics["success_auc"].mean > base.mixed.metrics["success_auc"].mean
  assert base.all.n_prompts == 25
  assert base.mixed.n_prompts == sum(p.has_both_outcomes for p in base.prompts)
  # AUC is only defined on mixed prompts, so both subsets agree on it.
  assert base.all.metrics["success_auc"] == base.mixed.metrics["success_auc"]
  assert math.isnan(summary.condition("no_lengths").all.mean_prompt_length)
  again = report.summarize_conditions(_conditions(), n_resamples=200, seed=3)
  assert report.summary_to_dict(again) == report.summary_to_dict(summary)


def test_write_report(tmp_path):
  conditions = _conditions()
  # A condition where nothing succeeds: every mixed-only metric is undefined (n=0).
  conditions["all_fail"] = [(np.arange(4.0), np.zeros(4), np.zeros(4, bool), [5] * 4)] * 3
  summary = report.summarize_conditions(conditions, n_resamples=200)
  assert summary.condition("all_fail").mixed.n_prompts == 0
  paths = report.write_report(summary, tmp_path / "out")
  for p in (paths.json, paths.markdown, paths.confound_plot, *paths.bar_plots):
    assert p.exists() and p.stat().st_size > 0, p
  for p in (paths.confound_plot, *paths.bar_plots):
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(paths.bar_plots) == len(stats.METRICS)
  # Strict JSON (no NaN tokens) that round-trips to the same summary.
  text = paths.json.read_text()
  data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  loaded = report.load_summary(paths.json)
  assert report.summary_to_dict(loaded) == data == report.summary_to_dict(summary)
  md = paths.markdown.read_text()
  assert "| 2S1F |" in md and "success_auc" in md and "n/a" in md


def test_library_imports_neither_scipy_nor_matplotlib():
  # scipy is a test reference only; matplotlib loads lazily when a plot is written.
  code = ("import sys, mopd_jax.analysis, mopd_jax.passk; "
          "bad = [m for m in ('scipy', 'matplotlib') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_pearson_non_finite_is_nan():
  # A NaN must not slip through the [-1, 1] clip as -1.
  assert math.isnan(stats.pearson([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]))
