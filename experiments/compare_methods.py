"""Compare methods on the main job's task at the main job's budget, over several seeds.

    python experiments/compare_methods.py --methods grpo,sdpo,positive_only,mopd --seeds 0,1,2 \
        --out experiments/results/compare_methods_seeds

Each (method, seed) is one run of `configs/default.py` with only `method` and `seed` changed, so
prompts, rollouts per step, steps and evaluation prompts are identical across methods (the seed
moves sampling, peer draws and the evaluation's samples). Held-out mean@1 is evaluated at step 0
and every `--eval_every` steps (default: at each checkpoint of the main job, every 8 steps).

Resumable: runs already in `<out>/results.json` are skipped and every run is recorded as soon as
it finishes, so the comparison can be filled over several sessions. Runs go seed-major (every
method's seed 0, then seed 1, ...) so a partial table is balanced. Writes `results.json`, the
table `results.md` (per run, then mean +- standard error over seeds at the final step and at the
best evaluated checkpoint) and `held_out_vs_step.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class RunResult:
  method: str
  seed: int
  curve: list[tuple[int, float]]  # (step, held-out mean@1)
  wall_s: float
  commit: str

  @property
  def final(self) -> float:
    return self.curve[-1][1]

  @property
  def best(self) -> tuple[int, float]:
    """The best evaluated checkpoint after training started (step > 0)."""
    return max((p for p in self.curve if p[0] > 0), key=lambda p: p[1])


def git_commit() -> str:
  try:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run_one(method: str, seed: int, args) -> RunResult:
  from configs import default
  from mopd_jax import trainer

  c = default.get_config(f"method={method}")
  c.seed = seed
  if args.steps:
    c.train.steps = args.steps
  c.eval.every = args.eval_every
  c.data.eval_size = args.eval_size
  c.logging.dir = os.path.join(args.out, f"{method}-seed{seed}")
  c.logging.progress = False
  c.checkpoint.dir = ""
  start = time.perf_counter()
  trainer.train(c)
  wall = time.perf_counter() - start
  curve = []
  with open(os.path.join(c.logging.dir, "eval.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      curve.append((row["step"], row["eval/mean_at_1"]))
  return RunResult(method, seed, sorted(curve), wall, git_commit())


def load(path: str) -> list[RunResult]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [RunResult(r["method"], r["seed"], [tuple(p) for p in r["curve"]], r["wall_s"], r["commit"])
            for r in json.load(f)]


def save(results: list[RunResult], path: str) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
  os.replace(path + ".tmp", path)  # a crash mid-write keeps the previous record


def mean_and_se(values: list[float]) -> tuple[float, float]:
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, float("nan")
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def table(results: list[RunResult], methods: list[str]) -> str:
  steps = sorted({s for r in results for s, _ in r.curve})
  lines = ["| method | seed | " + " | ".join(f"step {s}" for s in steps) + " | wall | commit |",
           "|---|---|" + "---|" * len(steps) + "---|---|"]
  for r in sorted(results, key=lambda r: (methods.index(r.method) if r.method in methods else 99, r.seed)):
    by_step = dict(r.curve)
    cells = " | ".join(f"{100 * by_step[s]:.1f}" if s in by_step else "" for s in steps)
    lines.append(f"| {r.method} | {r.seed} | {cells} | {r.wall_s / 60:.1f} min | {r.commit} |")
  lines += ["", "| method | seeds | start | final step (mean +- se) | best checkpoint (mean +- se) |",
            "|---|---|---|---|---|"]
  for m in methods:
    runs = [r for r in results if r.method == m]
    if not runs:
      continue
    start = mean_and_se([r.curve[0][1] * 100 for r in runs])
    final = mean_and_se([r.final * 100 for r in runs])
    best = mean_and_se([r.best[1] * 100 for r in runs])
    fmt = lambda ms: f"{ms[0]:.1f} +- {ms[1]:.1f}" if not math.isnan(ms[1]) else f"{ms[0]:.1f}"
    lines.append(f"| {m} | {','.join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed))} | {fmt(start)} "
                 f"| {fmt(final)} | {fmt(best)} |")
  return "\n".join(lines) + "\n"


def plot(results: list[RunResult], methods: list[str], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for k, m in enumerate(m for m in methods if any(r.method == m for r in results)):
    runs = [r for r in results if r.method == m]
    color = f"C{k}"
    for r in runs:
      ax.plot(*zip(*[(s, 100 * v) for s, v in r.curve]), color=color, alpha=0.25, linewidth=1)
    steps = sorted(set.intersection(*[{s for s, _ in r.curve} for r in runs]))
    stats = [mean_and_se([100 * dict(r.curve)[s] for r in runs]) for s in steps]
    means = [a for a, _ in stats]
    ses = [0.0 if math.isnan(b) else b for _, b in stats]
    ax.errorbar(steps, means, yerr=ses, color=color, marker="o", capsize=3, label=f"{m} (n={len(runs)})")
  ax.set_xlabel("step")
  ax.set_ylabel("held-out mean@1 (%)")
  ax.set_title("mean +- standard error over seeds (thin lines: single seeds)", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="grpo,sdpo,positive_only,mopd")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=0, help="0 = the main job's steps")
  parser.add_argument("--eval_every", type=int, default=8)
  parser.add_argument("--eval_size", type=int, default=200)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "compare_methods_seeds"))
  parser.add_argument("--report_only", action="store_true", help="rewrite the table and plot, run nothing")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  methods = args.methods.split(",")
  record = os.path.join(args.out, "results.json")
  results = load(record)
  done = {(r.method, r.seed) for r in results}
  todo = [] if args.report_only else [
      (m, s) for s in map(int, args.seeds.split(",")) for m in methods if (m, s) not in done]
  for i, (method, seed) in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {method} seed {seed}", flush=True)
    results.append(run_one(method, seed, args))
    save(results, record)
    print(f"  held-out: {results[-1].curve} ({results[-1].wall_s / 60:.1f} min)", flush=True)
  if not results:
    raise SystemExit(f"no results in {record}")
  text = table(results, methods)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(text)
  plot(results, methods, os.path.join(args.out, "held_out_vs_step.png"))
  print(text)


if __name__ == "__main__":
  main()
