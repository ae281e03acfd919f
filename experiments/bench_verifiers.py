"""Verifier throughput: verdicts per second through `verify_batch` (median of 3 runs).

  python experiments/bench_verifiers.py [--workers 2] [--arithmetic 512] [--runs 3]

Workloads:
  arithmetic  reasoning-gym basic_arithmetic, "math" verifier, half the completions right
              (\\boxed{answer}), half wrong (\\boxed{answer + 1}).
  humaneval   the 164 canonical solutions (must all pass) and 164 `return None` bodies
              (must all fail), "code" verifier (sandboxed execution of the tests).
The worker pool is started and warmed before timing (one untimed pass), as in training
where the pool lives across steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time

from mopd_jax.tasks import load_task
from mopd_jax.types import Example
from mopd_jax.verifiers.base import VerifierPool


def arithmetic_batch(n: int) -> tuple[list[Example], list[str], list[bool]]:
  examples = list(load_task("basic_arithmetic", size=n, seed=0))
  completions, expected = [], []
  for i, e in enumerate(examples):
    right = i % 2 == 0
    answer = e.reference if right else str(int(e.reference) + 1)
    completions.append(f"Let me compute. The result is \\boxed{{{answer}}}.")
    expected.append(right)
  return examples, completions, expected


def humaneval_batch() -> tuple[list[Example], list[str], list[bool]]:
  examples = list(load_task("humaneval"))
  completions, expected = [], []
  for e in examples:
    prompt = e.metadata["prompt_code"]
    completions.append(f"```python\n{prompt}{e.metadata['canonical_solution']}\n```")
    expected.append(True)
  for e in examples:
    completions.append(f"```python\n{e.metadata['prompt_code']}    return None\n```")
    expected.append(False)
  return examples + examples, completions, expected


def bench(pool: VerifierPool, name: str, batch: tuple[list[Example], list[str], list[bool]],
          runs: int, deadline_s: float) -> dict[str, object]:
  examples, completions, expected = batch
  pool.verify(examples, completions, deadline_s=deadline_s)  # warm-up: workers, imports
  times, wrong = [], 0
  for _ in range(runs):
    start = time.perf_counter()
    verdicts = pool.verify(examples, completions, deadline_s=deadline_s)
    times.append(time.perf_counter() - start)
    wrong = max(wrong, sum(v.success != want for v, want in zip(verdicts, expected)))
  median = statistics.median(times)
  return {"workload": name, "items": len(examples), "median_s": round(median, 3),
          "verdicts_per_s": round(len(examples) / median, 1),
          "runs_s": [round(t, 3) for t in times], "unexpected_verdicts": wrong}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--arithmetic", type=int, default=512)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--deadline", type=float, default=30.0)
  args = parser.parse_args()
  print(f"python {platform.python_version()}, {args.workers} workers, "
        f"median of {args.runs} runs")
  results = []
  with VerifierPool(args.workers) as pool:
    results.append(bench(pool, "arithmetic (math)", arithmetic_batch(args.arithmetic),
                         args.runs, args.deadline))
    if importlib.util.find_spec("mopd_jax.verifiers.code") is None:
      print("humaneval: skipped (mopd_jax.verifiers.code not present)")
    else:
      results.append(bench(pool, "humaneval (code)", humaneval_batch(), args.runs,
                           args.deadline))
  print(f"{'workload':<20} {'items':>6} {'median s':>9} {'verdicts/s':>11} {'unexpected':>10}")
  for r in results:
    print(f"{r['workload']:<20} {r['items']:>6} {r['median_s']:>9} {r['verdicts_per_s']:>11} "
          f"{r['unexpected_verdicts']:>10}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
