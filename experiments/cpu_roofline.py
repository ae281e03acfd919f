"""How fast can any decode step be on this CPU? The matmuls alone, against transformers' step.

  python experiments/cpu_roofline.py                 # SmolLM2-135M shape, 64 rows (8x8)
  python experiments/cpu_roofline.py --rows 256      # 32x8

One decode step of a dense decoder is (per row) one matrix-vector product with every weight
matrix: q, k, v, o, gate, up, down in each layer, then the unembedding. At 64 rows these are
[64, in] x [in, out] matmuls, and they are nearly all of the step's FLOPs (attention over a
128-slot cache is < 2%). This script times exactly those matmuls, nothing else, as one jitted
XLA program (all cores) and in torch on 1 thread and on torch's default threads, float32.

The XLA time is a floor for any JAX decode step on this machine (a real step adds attention,
norms, RoPE, sampling and the cache update). Dividing transformers' measured decode step
(`bench_sampler.py`) by it gives the largest speedup over transformers that any JAX sampler
could show here; the issue's CPU target (>= 5x) is compared against that ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.models.config import PRESETS


def matmul_shapes(preset: str) -> list[tuple[int, int]]:
  c = PRESETS[preset]
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
           (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
           (c.intermediate_size, c.hidden_size)]
  return layer * c.num_layers + [(c.hidden_size, c.vocab_size)]


def median_ms(fn, runs: int) -> tuple[float, list[float]]:
  fn()  # warm-up (and compilation)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), times


def time_xla(shapes, rows: int, runs: int) -> tuple[float, list[float]]:
  rng = np.random.default_rng(0)
  weights = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes]
  xs = {din: jnp.asarray(rng.standard_normal((rows, din), np.float32)) for din, _ in shapes}

  @jax.jit
  def chain(xs, weights):
    # Each product waits for the previous one (as in the model) and every output element is
    # used (a mean, not a slice: XLA may shrink a dot whose output is only sliced).
    previous = jnp.zeros((), jnp.float32)
    for w in weights:
      previous = jnp.mean((xs[w.shape[0]] + previous) @ w) * 1e-6
    return previous

  return median_ms(lambda: chain(xs, weights).block_until_ready(), runs)


def time_torch(shapes, rows: int, runs: int, threads: int) -> tuple[float, list[float]]:
  import torch
  torch.set_num_threads(threads)
  gen = torch.Generator().manual_seed(0)
  weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
  xs = {din: torch.randn(rows, din, generator=gen) for din, _ in shapes}

  def chain():
    with torch.no_grad():
      for w in weights:
        xs[w.shape[0]] @ w

  return median_ms(chain, runs)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--hf-step-ms", type=float, default=None,
                 help="transformers' measured decode step (bench_sampler.py) to compare against")
  args = p.parse_args(argv)
  shapes = matmul_shapes(args.preset)
  gflop = sum(2 * args.rows * a * b for a, b in shapes) / 1e9
  print(f"{args.preset}: {len(shapes)} matmuls per decode step at {args.rows} rows, {gflop:.2f} GFLOP, "
        f"float32, devices: {jax.devices()[0].platform} x{jax.device_count()}")
  import torch
  default_threads = torch.get_num_threads()  # before time_torch changes it
  results = {"xla (all cores)": time_xla(shapes, args.rows, args.runs),
             "torch 1 thread": time_torch(shapes, args.rows, args.runs, 1),
             f"torch {default_threads} threads (default)": time_torch(shapes, args.rows, args.runs, default_threads)}
  for name, (ms, runs) in results.items():
    print(f"  {name:28s} median {ms:8.1f} ms  {gflop / ms * 1e3:6.1f} GFLOP/s  "
          f"(runs: {', '.join(f'{t:.1f}' for t in runs)})")
  floor = results["xla (all cores)"][0]
  if args.hf_step_ms:
    print(f"transformers decode step {args.hf_step_ms:.1f} ms / XLA matmul floor {floor:.1f} ms = "
          f"{args.hf_step_ms / floor:.2f}x: the most any JAX sampler can gain here")


if __name__ == "__main__":
  main()
