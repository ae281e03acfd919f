"""Compare methods on the main job's task with the same rollout budget and seeds.

    python experiments/compare_methods.py --methods grpo,sdpo,positive_only,mopd --seeds 0 \
        --steps 10 --eval_every 5 --out experiments/results/compare_methods

Each (method, seed) is one run of `configs/default.py` with only `method` and `seed` changed, so
prompts, rollouts per step, steps and evaluation prompts are identical across methods. Held-out
mean@1 is evaluated at step 0 and every `--eval_every` steps. Writes `results.json`, a markdown
table `results.md` and `held_out_vs_step.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(method: str, seed: int, args) -> list[tuple[int, float]]:
  from configs import default
  from mopd_jax import trainer

  c = default.get_config(f"method={method}")
  c.seed = seed
  c.train.steps = args.steps
  c.eval.every = args.eval_every
  c.data.eval_size = args.eval_size
  c.logging.dir = os.path.join(args.out, f"{method}-seed{seed}")
  c.logging.progress = False
  c.checkpoint.dir = ""
  trainer.train(c)
  curve = []
  with open(os.path.join(c.logging.dir, "eval.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      curve.append((row["step"], row["eval/mean_at_1"]))
  return sorted(curve)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curves in results.items():
    for seed, curve in curves.items():
      steps, values = zip(*curve)
      ax.plot(steps, [100 * v for v in values], marker="o", label=f"{name} (seed {seed})")
  ax.set_xlabel("step")
  ax.set_ylabel("held-out mean@1 (%)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="grpo,sdpo,positive_only,mopd")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--eval_every", type=int, default=5)
  parser.add_argument("--eval_size", type=int, default=200)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "compare_methods"))
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  os.makedirs(args.out, exist_ok=True)
  results: dict = {}
  for method in args.methods.split(","):
    for seed in map(int, args.seeds.split(",")):
      results.setdefault(method, {})[seed] = run_one(method, seed, args)
      with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
  lines = ["| method | seed | " + " | ".join(f"step {s}" for s, _ in next(iter(next(iter(results.values())).values())))
           + " |", "|---|---|" + "---|" * len(next(iter(next(iter(results.values())).values())))]
  for method, curves in results.items():
    for seed, curve in curves.items():
      lines.append(f"| {method} | {seed} | " + " | ".join(f"{100 * v:.1f}" for _, v in curve) + " |")
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(results, os.path.join(args.out, "held_out_vs_step.png"))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
