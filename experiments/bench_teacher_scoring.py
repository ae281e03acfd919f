"""Teacher scoring, context reuse vs naive: C contexts x R responses each, random weights, CPU.

    python experiments/bench_teacher_scoring.py [--contexts 8] [--responses 8] [--context_len 128]
        [--response_len 32] [--runs 3] [--preset smollm2-135m] [--layers 0]

Naive (`scoring.score_full`): one forward over [context | response] per pair, C*R rows of
context_len + response_len tokens. Reuse (`scoring.score_pairs`): each context prefilled once
(C rows), then the C*R responses as continuations of copies of their context's cache. Both
score the same pairs (checked equal); after one warm-up each (compilation), timed calls
alternate between the two so load from other processes hits both alike. Prints the median of
`--runs` each and the speedup. `--layers N` shrinks the model's depth (0 = the preset's).
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np
from flax import nnx

from experiments.bench_forward import timed
from mopd_jax.analysis import scoring
from mopd_jax.models import get_preset, init_model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contexts", type=int, default=8)
  parser.add_argument("--responses", type=int, default=8, help="responses per context")
  parser.add_argument("--context_len", type=int, default=128)
  parser.add_argument("--response_len", type=int, default=32)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--preset", default="smollm2-135m")
  parser.add_argument("--layers", type=int, default=0)
  args = parser.parse_args()

  config = get_preset(args.preset).replace(param_dtype="float32", dtype="float32")
  if args.layers:
    config = config.replace(num_layers=args.layers)
  model = nnx.split(init_model(config, seed=0))
  rng = np.random.default_rng(0)
  contexts = [rng.integers(0, config.vocab_size, args.context_len).tolist() for _ in range(args.contexts)]
  pairs = [(c, rng.integers(0, config.vocab_size, args.response_len).tolist())
           for c in contexts for _ in range(args.responses)]
  n_pairs = len(pairs)
  # Exact buckets (no padding waste in either path); one batch of all rows each.
  params = scoring.ScoringParams(
      context_buckets=(args.context_len,), response_buckets=(args.response_len,),
      context_batch=args.contexts, response_batch=n_pairs)
  run_reuse = lambda: scoring.score_pairs(model, pairs, params=params)
  run_naive = lambda: scoring.score_full(model, pairs, params=params)
  print(f"{args.preset} shape ({config.num_layers} layers), float32, {args.contexts} contexts x "
        f"{args.responses} responses = {n_pairs} pairs, context {args.context_len} + response "
        f"{args.response_len} tokens, {args.runs} runs, devices: {jax.devices()[0].device_kind} x{len(jax.devices())}")
  warm_reuse, warm_naive = timed(run_reuse), timed(run_naive)
  a, b = run_reuse(), run_naive()
  err = float(np.max(np.abs(a.sum_logprob - b.sum_logprob)))
  reuse, naive = [], []
  for _ in range(args.runs):
    reuse.append(timed(run_reuse))
    naive.append(timed(run_naive))
  t_reuse, t_naive = statistics.median(reuse), statistics.median(naive)
  fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)
  tokens_naive = n_pairs * (args.context_len + args.response_len)
  tokens_reuse = args.contexts * args.context_len + n_pairs * args.response_len
  print(f"naive (score_full)   median {t_naive:7.2f} s  (runs: {fmt(naive)} s; warm-up incl. compile "
        f"{warm_naive:.1f} s)  {tokens_naive} tokens forwarded")
  print(f"reuse (score_pairs)  median {t_reuse:7.2f} s  (runs: {fmt(reuse)} s; warm-up incl. compile "
        f"{warm_reuse:.1f} s)  {tokens_reuse} tokens forwarded")
  print(f"max |sum log-prob difference| = {err:.2e}")
  print(f"speedup of context reuse: {t_naive / t_reuse:.2f}x (token ratio {tokens_naive / tokens_reuse:.2f}x)")


if __name__ == "__main__":
  main()
