"""Continuous refill (`SamplingParams.decode_rows`) vs the one-batch decoder, on one step whose
response lengths follow a real run's.

  python experiments/bench_refill.py                  # 48 prompts x 8, the small model, 3 runs
  python experiments/bench_refill.py --quick          # smoke run: 8 prompts x 8, tiny model, 1 run
  python experiments/bench_refill.py --rows 192,96,64 --free-rows 1 --runs 5

Lengths: the 384 responses of experiments/results/teacher_signal_smollm2/rollouts.jsonl
(SmolLM2-135M-Instruct, 48 prompts x 8, temperature 0.7, 64 new tokens; `response_tokens` and
`finish_reasons` per rollout; the rollouts.md files of compare_methods_seeds hold text only).
Their empirical distribution gives a stop hazard h[i] = P(stop at token i | no stop before i).

Model: random weights (`--preset`, default a small llama-family shape), whose stop token is
forced to the hazard: at token i the sampler's distribution (temperature 0.7) gives the stop
token exactly probability h[i], every other token its model probability renormalised. So every
step runs the full model and the real sampler over the whole vocabulary; only the stop
decision is rigged, each row's length an independent draw from the source distribution (the
source's correlation between a prompt's 8 lengths is not kept; row-level refill does not depend
on it). Prompts: random tokens, all `--prompt-len` long (the forcing reads the token index from
the RoPE position).

Before: `decode_rows=None` (all B*G rows decode until the longest ends). After: `decode_rows=R`
for each `--rows` (R rows decode at a time, a finished row taking the next sample). Same rng:
the rollouts are identical (checked). Reported per setting:
- decode slot-steps: rows x decode-loop iterations (`SampleResult.decode_slot_steps`);
- useful/slot-step: response tokens made by decode steps (each row's length - 1; token 0 comes
  from the prefill) per slot-step, i.e. the fraction of decode work that makes a kept token;
- wall: `sample()` end to end (prefill, decode, copies to the host), the median of `--runs`
  runs after one untimed warm-up (compilation), runs interleaved over the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

SOURCE = pathlib.Path(__file__).parent / "results" / "teacher_signal_smollm2" / "rollouts.jsonl"
SOURCE_TEMPERATURE = 0.7


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smoke run: 8 prompts, tiny model, 1 run")
  p.add_argument("--prompts", type=int, default=None, help="prompts in the step (default 48; --quick 8)")
  p.add_argument("--samples", type=int, default=8, help="G, samples per prompt")
  p.add_argument("--rows", default=None, help="comma-separated decode_rows R (default B*G/4, B*G/8)")
  p.add_argument("--free-rows", type=int, default=None, help="refill_free_rows (default: R // 16)")
  p.add_argument("--preset", default=None, help="model shape: 'small' (default), 'tiny', or a config preset")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--runs", type=int, default=None, help="timed runs per setting (default 3; --quick 1)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def source_lengths(path: pathlib.Path = SOURCE):
  """(lengths [n], stopped [n] bool, max_new_tokens) of every rollout in a rollouts.jsonl."""
  import numpy as np

  lengths, stopped = [], []
  for line in path.read_text().splitlines():
    record = json.loads(line)
    lengths += [len(t) for t in record["response_tokens"]]
    stopped += [r == "stop" for r in record["finish_reasons"]]
  lengths, stopped = np.array(lengths), np.array(stopped)
  return lengths, stopped, int(lengths.max())


def stop_hazard(lengths, stopped, max_new_tokens: int):
  """h[i] = P(token i is the stop | the row reached token i), from rows that ended by a stop."""
  import numpy as np

  reached = np.array([(lengths > i).sum() for i in range(max_new_tokens)])
  stops = np.bincount(lengths[stopped] - 1, minlength=max_new_tokens)[:max_new_tokens]
  return np.where(reached > 0, stops / np.maximum(reached, 1), 0.0)


def model_config(name: str):
  from mopd_jax.models import get_preset, tiny_config

  if name == "small":  # SmolLM2-135M's widths at 6 layers and a 16k vocabulary: a few s per step on 2 cores
    return tiny_config("llama", vocab_size=16384, hidden_size=576, intermediate_size=1536, num_layers=6,
                       num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True)
  if name == "tiny":
    return tiny_config("llama")
  return dataclasses.replace(get_preset(name), dtype="float32", param_dtype="float32")


def length_forced_model(config, hazard, *, prompt_len: int, stop_id: int, temperature: float, seed: int):
  """The random-weight Transformer whose stop token gets probability hazard[i] at token i."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mopd_jax.models.transformer import Transformer

  never = -1e30
  h = np.clip(hazard, 0.0, 1 - 1e-6)
  log_odds = tuple(float(x) for x in np.where(h > 0, np.log(np.maximum(h, 1e-30)) - np.log1p(-h), never))

  class LengthForced(Transformer):

    def logits(self, hidden):
      # The prefill's logits draw token 0: never the stop token (no source row is that short).
      return super().logits(hidden).at[..., stop_id].set(never)

    def __call__(self, tokens, positions, segment_ids, cache=None, **kw):
      out = super().__call__(tokens, positions, segment_ids, cache, **kw)
      if out.logits is None or cache is None:
        return out
      last = out.logits[:, -1]  # [R, V], stop already at `never`
      index = jnp.clip(positions[:, -1] - prompt_len + 1, 0, len(log_odds) - 1)  # the token these logits draw
      # P(stop) = h under softmax(logits / T): stop / T = log(h / (1 - h)) + logsumexp(others / T).
      others = jax.nn.logsumexp(last / temperature, axis=-1)
      stop = temperature * (jnp.asarray(log_odds)[index] + others)
      return out.replace(logits=out.logits.at[:, -1, stop_id].set(stop))

  return nnx.split(LengthForced(config, rngs=nnx.Rngs(seed)))


def main(argv=None) -> None:
  args = parse_args(argv)
  import jax
  import numpy as np

  from mopd_jax import sampling

  prompts_n = args.prompts or (8 if args.quick else 48)
  runs = args.runs or (1 if args.quick else 3)
  g = args.samples
  total = prompts_n * g
  rows = [int(r) for r in args.rows.split(",")] if args.rows else [total // 4, total // 8]
  config = model_config(args.preset or ("tiny" if args.quick else "small"))

  lengths, stopped, max_new = source_lengths()
  hazard = stop_hazard(lengths, stopped, max_new)
  stop_id = config.vocab_size - 1
  model = length_forced_model(config, hazard, prompt_len=args.prompt_len, stop_id=stop_id,
                              temperature=SOURCE_TEMPERATURE, seed=args.seed)
  rs = np.random.RandomState(args.seed)
  prompts = [list(rs.randint(0, stop_id, size=args.prompt_len)) for _ in range(prompts_n)]
  base = sampling.SamplingParams(
      temperature=SOURCE_TEMPERATURE, max_new_tokens=max_new, stop_token_ids=(stop_id,), pad_id=0,
      prompt_buckets=sampling.power_of_two_buckets(16, 1024), generation_buckets=(max_new,))
  settings = [("one batch", base)] + [
      (f"refill R={r}", base.replace(decode_rows=r, refill_free_rows=args.free_rows)) for r in rows]
  rng = jax.random.key(args.seed)
  call = lambda p: sampling.sample(model, prompts, num_samples=g, rng=rng, sampling_params=p)

  print(f"source: {SOURCE.relative_to(pathlib.Path(__file__).parent.parent)}: {len(lengths)} rollouts, "
        f"mean length {lengths.mean():.1f}, {np.mean(lengths == max_new):.0%} at {max_new}")
  print(f"model: {args.preset or ('tiny' if args.quick else 'small')} ({config.num_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}), random weights, float32; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
  results = {name: call(p) for name, p in settings}  # warm-up: compiles every program
  want = results["one batch"]
  for name, res in results.items():  # same rollouts
    np.testing.assert_array_equal(res.tokens, want.tokens, err_msg=name)
    np.testing.assert_array_equal(res.lengths, want.lengths, err_msg=name)
  print(f"step: {prompts_n} prompts x {g} samples = {total} rows, prompt {args.prompt_len} tokens, "
        f"lengths drawn: mean {want.lengths.mean():.1f}, {np.mean(want.lengths == max_new):.0%} at {max_new}, "
        f"longest {want.lengths.max()}; identical rollouts in every setting")

  times = {name: [] for name, _ in settings}
  for _ in range(runs):
    for name, p in settings:
      start = time.perf_counter()
      call(p)
      times[name].append(time.perf_counter() - start)

  print(f"load average while timing (this machine is shared): {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores")
  useful = int((want.lengths - 1).sum())
  base_wall = statistics.median(times["one batch"])
  print()
  print(f"| setting | decode rows | refill when free | decode slot-steps | useful/slot-step "
        f"| wall (s, median of {runs}) | wall vs one batch |")
  print("|---|---|---|---|---|---|---|")
  for name, p in settings:
    res, wall = results[name], statistics.median(times[name])
    free = "-" if p.decode_rows is None else str(p.refill_threshold)
    print(f"| {name} | {p.decode_rows or total} | {free} | {res.decode_slot_steps} | "
          f"{useful / res.decode_slot_steps:.3f} | {wall:.2f} | {wall / base_wall:.2f}x |")


if __name__ == "__main__":
  main()
