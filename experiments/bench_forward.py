"""Forward throughput, SmolLM2-135M shape, random float32 weights, CPU: ours (jit) vs transformers.

    python experiments/bench_forward.py [--batch 4] [--seq 256] [--runs 5]

Both compute full-vocabulary logits for every position of the same token batch. After one
warm-up each (ours includes the compile), timed calls alternate between the two, so load from
other processes on a shared machine hits both alike; reports the median of `--runs` each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mopd_jax.models import get_preset, init_model, positions_from_segments


def make_ours(config, tokens: np.ndarray):
  model = init_model(config, seed=0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    seg = jnp.ones_like(tokens)
    return nnx.merge(graphdef, state)(tokens, positions_from_segments(seg), seg).logits

  x = jnp.asarray(tokens)
  return lambda: forward(state, x).block_until_ready()


def make_transformers(config, tokens: np.ndarray):
  import torch
  import transformers

  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
      rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
      max_position_embeddings=config.max_position_embeddings)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval().float()
  x = torch.tensor(tokens, dtype=torch.long)
  mask = torch.ones_like(x)

  def forward():
    with torch.no_grad():
      return model(input_ids=x, attention_mask=mask, use_cache=False).logits

  return forward


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--preset", default="smollm2-135m")
  args = parser.parse_args()

  config = get_preset(args.preset).replace(param_dtype="float32", dtype="float32")
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
  n = args.batch * args.seq
  print(f"{args.preset} shape, float32, batch {args.batch} x {args.seq} = {n} tokens, "
        f"{args.runs} runs, devices: {jax.devices()[0].device_kind} x{len(jax.devices())}")
  run_ours, run_theirs = make_ours(config, tokens), make_transformers(config, tokens)
  warmup = timed(run_ours)
  timed(run_theirs)
  ours, theirs = [], []
  for _ in range(args.runs):
    ours.append(timed(run_ours))
    theirs.append(timed(run_theirs))
  t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
  print(f"ours (jax.jit)          median {t_ours * 1e3:8.1f} ms  {n / t_ours:9.0f} tok/s  "
        f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in ours)} ms; warm-up incl. compile {warmup:.1f} s)")
  print(f"transformers (no_grad)  median {t_theirs * 1e3:8.1f} ms  {n / t_theirs:9.0f} tok/s  "
        f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in theirs)} ms)")
  print(f"ours / transformers throughput ratio: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
  main()
