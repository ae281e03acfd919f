"""Evaluation: mean@k / pass@k of a checkpoint (`python -m mopd_jax.evaluate`).

    python -m mopd_jax.evaluate                                  # SmolLM2-135M-Instruct, held-out arithmetic
    python -m mopd_jax.evaluate --config=configs/evaluate.py:tiny  # random tiny model, < 1 minute
    python -m mopd_jax.evaluate --checkpoint=runs/default/checkpoints --k=8 --num_items=100

The main job's config (configs/default.py: model, task, prompt format, sampler buckets,
verifier) plus an `evaluate` section; `config.eval` holds k, temperature, top_p, max_new_tokens.
"""

import ml_collections

from configs import default
from mopd_jax import config_lib


def evaluate_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      checkpoint="",  # "" = config.model.checkpoint; or .gguf / HF dir / orbax run or params dir
      params="student",  # orbax run checkpoints: "student" or "teacher" params
      step=-1,  # orbax run checkpoints: -1 = latest
      split="held_out",  # "held_out" (trainer's eval prompts) | "train" | "all" (fixed benchmarks)
      num_items=100,  # 0 = every item of the split
      ks=(),  # pass@k for these k; () = 1, 2, 4, ..., eval.num_samples
      seed=0,
      out_dir="",  # "" = runs/eval-<time>
      progress=True,
  ))


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, size="default")
  c = default.get_config("tiny" if a.size == "tiny" else None)
  c.evaluate = evaluate_section()
  c.eval.num_samples = 8
  c.eval.batch_prompts = 8
  if a.size == "tiny":
    c.evaluate.num_items = 4
    c.eval.num_samples = 2
    c.evaluate.progress = False
  return c
