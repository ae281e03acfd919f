"""Compile time against depth: scanned layers (`model.scan_layers=True`, the default) vs the
same stacked parameters unrolled in Python (`scan_layers=False`, what the model did before).

  python experiments/bench_compile.py                          # depths 8,16,32, 3 runs each
  python experiments/bench_compile.py --depths 8,32 --runs 1 --preset qwen3-0.6b

For each depth and mode, on this host's default backend (CPU here), from abstract states (no
weights, no memory):
- train: `jax.jit(make_train_step(...)).lower(...).compile()` of the MOPD step (EMA teacher,
  AdamW), `--rows` rows of `--prompt` + `--response` student tokens and `--teacher-prompt` +
  `--response` teacher tokens (bench_train_step.synthetic_batch shapes);
- sample: the sampler's two programs, `sampling._prefill` and the `sampling._decode` while
  loop, for `--rows` rows (`--rows / 8` prompts x 8 samples), `--prompt` + `--response` tokens.
Each figure is the median of `--runs` compiles, with `jax.clear_caches()` before each so no
compile is served from a cache. The two modes alternate within a depth so both see the same
machine load. The preset keeps its width; only `num_layers` changes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--depths", default="8,16,32")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--teacher-prompt", type=int, default=128)
  p.add_argument("--response", type=int, default=64)
  p.add_argument("--programs", default="train,sample")
  return p.parse_args(argv)


def compile_train(cfg, args) -> float:
  import jax
  import numpy as np

  from experiments.bench_train_step import Shape, build_states, synthetic_batch
  from mopd_jax.train_step import StepConfig, make_train_step

  step_cfg = StepConfig(group_size=8)
  graphdef, opt, lr_fn, state, teacher = build_states(cfg, step_cfg, abstract=True)
  shape = Shape(rows=args.rows, prompt=args.prompt, teacher_prompt=args.teacher_prompt, response=args.response)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                       synthetic_batch(cfg, shape, group_size=8))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  step = jax.jit(make_train_step(graphdef, opt, step_cfg, learning_rate_fn=lr_fn), donate_argnums=(0, 1))
  start = time.perf_counter()
  step.lower(state, teacher, batch, rng).compile()
  return time.perf_counter() - start


def compile_sampler(cfg, args) -> float:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mopd_jax import sampling
  from mopd_jax.models import abstract_model
  from mopd_jax.sampling import SamplingParams

  graphdef, state = nnx.split(abstract_model(cfg))
  group = 8
  prompts = max(args.rows // group, 1)
  tokens = jax.ShapeDtypeStruct((prompts, args.prompt), jnp.int32)
  lengths = jax.ShapeDtypeStruct((prompts,), jnp.int32)
  static = dict(num_samples=group, generation_len=args.response, mesh=None)
  params = SamplingParams(max_new_tokens=args.response)
  start = time.perf_counter()
  sampling._prefill.lower(graphdef, state, tokens, lengths, **static).compile()
  prefilled = jax.eval_shape(lambda s, t, l: sampling._prefill(graphdef, s, t, l, **static), state, tokens, lengths)
  rows = prompts * group
  sampling._decode.lower(
      graphdef, state, prefilled.cache, prefilled.logits, prefilled.positions,
      jax.ShapeDtypeStruct((), jax.random.key(0).dtype), jax.ShapeDtypeStruct((rows,), jnp.int32),
      sampling.limits(params), rule=params.token_rule(), generation_len=args.response, mesh=None).compile()
  return time.perf_counter() - start


def main(argv=None) -> None:
  args = parse_args(argv)
  import jax

  from mopd_jax.models import get_preset

  programs = {"train": compile_train, "sample": compile_sampler}
  chosen = [p for p in args.programs.split(",") if p]
  print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} cpus); preset {args.preset}; "
        f"{args.rows} rows, prompt {args.prompt}, teacher prompt {args.teacher_prompt}, response {args.response}; "
        f"median of {args.runs} compiles")
  print(f"{'program':8} {'layers':>6} {'scanned s':>10} {'unrolled s':>11} {'ratio':>6}")
  for program in chosen:
    for depth in [int(d) for d in args.depths.split(",")]:
      times = {True: [], False: []}
      for _ in range(args.runs):
        for scan in (True, False):
          cfg = get_preset(args.preset).replace(num_layers=depth, scan_layers=scan)
          jax.clear_caches()
          times[scan].append(programs[program](cfg, args))
      scanned, unrolled = statistics.median(times[True]), statistics.median(times[False])
      print(f"{program:8} {depth:>6} {scanned:>10.2f} {unrolled:>11.2f} {unrolled / scanned:>6.1f}x", flush=True)


if __name__ == "__main__":
  main()
