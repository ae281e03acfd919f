"""Held-out success of the main job's models, split by operand size (1+1, mixed, 2+2 digits).

    python experiments/heldout_by_digits.py runs/exp/a/ckpt:10 runs/exp/b/ckpt:10
    python experiments/heldout_by_digits.py --config-arg closing=one_line \
        --set data.train_size=40 --set "data.prompt_buckets=(64,)" runs/exp/a/ckpt:10

Builds the run of `configs/default.py` (with the given argument and dotted overrides), then
evaluates the initial model and each `checkpoint_dir:step` (student params) on its held-out
split exactly as the trainer does at the end of a run (same prompts, same sampling key), and
prints mean@k overall and per operand-size class. The held-out split excludes the training
pool (`data.train_size` prompts) and repeats no prompt, so a larger pool leaves fewer of the 100
possible one-digit sums and skews it toward two-digit sums (see experiments/README.md).
"""

from __future__ import annotations

import argparse
import ast
import collections
import re

import jax


def operand_class(prompt_text: str) -> str:
  a, b = re.findall(r"\d+", prompt_text)[:2]
  digits = len(a) + len(b)
  return "1+1" if digits == 2 else ("2+2" if digits == 4 else "mixed")


def apply_override(config, assignment: str) -> None:
  key, _, value = assignment.partition("=")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = ast.literal_eval(value)


def report(run, tag: str) -> None:
  from mopd_jax import trainer

  result = trainer.evaluate(run, run.eval_examples, jax.random.key(run.config.seed + 1))
  by_class = collections.defaultdict(list)
  for example, successes in zip(run.eval_examples, result.per_item_success):
    by_class[operand_class(example.prompt[-1].content)].append(sum(successes) / len(successes))
  cells = ", ".join(f"{k} {100 * sum(v) / len(v):.1f}% of {len(v)}" for k, v in sorted(by_class.items()))
  print(f"{tag}: mean@{result.k} {100 * result.mean_at_k:.1f}%  ({cells})", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("checkpoints", nargs="*", help="checkpoint_dir:step of main-job runs")
  p.add_argument("--config-arg", default=None, help="argument of configs/default.py, e.g. closing=one_line")
  p.add_argument("--set", action="append", default=[], help="dotted override, e.g. data.train_size=40")
  args = p.parse_args()

  from configs import default
  from mopd_jax import checkpointing, trainer

  c = default.get_config(args.config_arg)
  for assignment in args.set:
    apply_override(c, assignment)
  c.logging.dir = c.checkpoint.dir = ""
  c.logging.progress = False
  run = trainer.setup(c)
  report(run, "initial model")
  for spec in args.checkpoints:
    directory, step = spec.rsplit(":", 1)
    arrays, _ = checkpointing.RunCheckpointer(directory, async_save=False).restore(
        run.checkpoint_arrays(), step=int(step), shardings=run.checkpoint_shardings())
    run.state = arrays["state"]
    report(run, spec)


if __name__ == "__main__":
  main()
