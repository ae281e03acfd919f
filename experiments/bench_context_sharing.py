"""MOPD train step with each group's teacher contexts encoded once vs one teacher forward per row.

    python experiments/bench_context_sharing.py [--prompts 2] [--group 8] [--context_len 512]
        [--response_len 256] [--success_rate 0.41] [--layers 4] [--peers mopd_2s1f] [--runs 3] [--quick]

Which rollouts share a teacher context comes from the real peer construction
(`peers.build_teacher_contexts`, preset `--peers`; mopd_2s1f draws the failure peer per rollout):
groups of G rollouts with successes drawn at `--success_rate` (default: the mean
rollout/success_rate of experiments/results/compare_methods_seeds/mopd-seed0/metrics.jsonl,
0.41). Each distinct context becomes `--context_len` random tokens, each response
`--response_len` (the paper's buckets are 10240 teacher + 8192 response tokens; their ratio
is kept roughly, scaled to what a 2-core CPU runs). SmolLM2-135M's shape at `--layers`
layers, random float32 weights, one process: the jitted MOPD step (EMA teacher) with
`teacher.share_contexts` on and off on the same batch, and the teacher forward alone. After a
warm-up each, timed calls alternate; medians of `--runs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np
from flax import nnx

from experiments.bench_forward import timed
from mopd_jax import batching, methods, peers
from mopd_jax.models import get_preset, init_model
from mopd_jax.train_step import StepConfig, init_teacher_state, init_train_state, make_optimizer, make_train_step
from mopd_jax.types import Message
from mopd_jax.verifiers.base import Verdict


def peer_contexts(prompts: int, group: int, success_rate: float, seed: int, preset: str = "mopd_2s1f"
                  ) -> list[list[str]]:
  """The teacher context text of every rollout of `prompts` groups (`preset`'s real construction)."""
  rng = np.random.default_rng(seed)
  groups = []
  for p in range(prompts):
    success = rng.random(group) < success_rate
    groups.append(peers.Group(
        prompt=(Message("user", f"problem {p}"),), responses=tuple(f"answer {p}.{i}" for i in range(group)),
        verdicts=tuple(Verdict(reward=float(s), success=bool(s), feedback="wrong" if not s else "") for s in success)))
  contexts = peers.build_teacher_contexts(groups, peers.get_preset(preset), step=0)
  return [[repr(c.messages) for c in row] for row in contexts]


def make_rows(texts: list[list[str]], vocab: int, context_len: int, response_len: int, seed: int):
  rng = np.random.default_rng(seed)
  token_of = {t: rng.integers(1, vocab, context_len).tolist() for row in texts for t in row}
  n, g = sum(map(len, texts)), len(texts[0])
  responses = [rng.integers(1, vocab, response_len).tolist() for _ in range(n)]
  return batching.RolloutRows(
      student_prompts=[rng.integers(1, vocab, 64).tolist() for _ in range(n)],
      teacher_prompts=[token_of[t] for row in texts for t in row], responses=responses,
      sampler_logprobs=[(-np.log(vocab) + 0.1 * rng.standard_normal(response_len)).tolist() for _ in range(n)],
      distill_mask=[1.0] * n, rewards=[0.0] * n, success=[False] * n, group_ids=[i // g for i in range(n)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=2)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--context_len", type=int, default=512)
  parser.add_argument("--response_len", type=int, default=256)
  parser.add_argument("--success_rate", type=float, default=0.41)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--peers", default="mopd_2s1f", help="the peer preset that builds the contexts")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a smoke run: tiny lengths, 1 layer, 1 run")
  args = parser.parse_args()
  if args.quick:
    args.context_len, args.response_len, args.layers, args.runs = 64, 32, 1, 1

  config = get_preset("smollm2-135m").replace(param_dtype="float32", dtype="float32", num_layers=args.layers)
  texts = peer_contexts(args.prompts, args.group, args.success_rate, args.seed, args.peers)
  rows = make_rows(texts, config.vocab_size, args.context_len, args.response_len, args.seed)
  batch = batching.build_train_batch(rows, pad_id=0, prompt_buckets=(64,), teacher_prompt_buckets=(args.context_len,),
                                     response_buckets=(args.response_len,))
  distinct = [len(set(row)) for row in texts]
  n, k = len(rows.responses), batch.teacher_contexts.shape[0] // args.prompts
  per_row_tokens = n * (args.context_len + args.response_len)
  shared_tokens = args.prompts * k * args.context_len + n * args.response_len
  print(f"smollm2-135m shape at {args.layers} layers, float32, {args.prompts} prompts x G={args.group}, teacher "
        f"context {args.context_len} + response {args.response_len} tokens, devices: {jax.devices()[0].device_kind} "
        f"x{len(jax.devices())}, {args.runs} runs")
  print(f"distinct contexts per group ({args.peers}, success rate {args.success_rate}): {distinct}; slots K = {k}")
  print(f"teacher tokens per step: per row {per_row_tokens:,}, shared {shared_tokens:,} "
        f"({per_row_tokens / shared_tokens:.2f}x fewer)")

  graphdef, params = nnx.split(init_model(config, seed=0), nnx.Param)
  optimizer, _ = make_optimizer(1e-6)
  batch = jax.device_put(batch)

  def programs(share: bool):
    method = dataclasses.replace(methods.get("mopd"), teacher=methods.TeacherConfig("ema", share_contexts=share))
    cfg = StepConfig(method=method, group_size=args.group)
    state, teacher = init_train_state(params, optimizer), init_teacher_state(cfg, params)
    step = jax.jit(make_train_step(graphdef, optimizer, cfg))
    score = jax.jit(lambda t, b: method.no_grad_inputs(methods.Models(graphdef, None), None, t, b)[0])
    run_step = lambda: jax.block_until_ready(step(state, teacher, batch, jax.random.key(0)))
    run_score = lambda: jax.block_until_ready(score(teacher.params, batch))
    return run_step, run_score

  (step_on, score_on), (step_off, score_off) = programs(True), programs(False)
  h_on, h_off = np.asarray(score_on()), np.asarray(score_off())
  mask = np.asarray(batch.response_mask)[..., None] > 0
  print(f"teacher hidden states, shared vs per row: max |diff| {np.max(np.abs(np.where(mask, h_on - h_off, 0))):.2e}")
  for what, on, off in (("teacher forward", score_on, score_off), ("train step", step_on, step_off)):
    warm_on, warm_off = timed(on), timed(off)
    t_on, t_off = [], []
    for _ in range(args.runs):
      t_on.append(timed(on))
      t_off.append(timed(off))
    m_on, m_off = statistics.median(t_on), statistics.median(t_off)
    print(f"{what:>15}: per row {m_off:7.3f} s, shared {m_on:7.3f} s (median of {args.runs}; first call "
          f"{warm_off:.1f} / {warm_on:.1f} s): {m_off / m_on:.2f}x")
  print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
  main()
