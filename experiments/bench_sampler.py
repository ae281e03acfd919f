"""Grouped sampler vs Hugging Face `generate`: SmolLM2-135M shape, random weights, EOS disabled.

  python experiments/bench_sampler.py                       # CPU: 8x8 and 32x8, 64 + 64 tokens
  python experiments/bench_sampler.py --device gpu          # GPU: 8x8 and 32x8, 128 + 256, bf16
  python experiments/bench_sampler.py --shapes 8x8 --prompt-len 128 --new-tokens 128 --runs 5
  python experiments/bench_sampler.py --device gpu --shapes 8x8 --no-hf --profile /tmp/prof

A shape BxG is B prompts x G samples each (B*G rows). Both sides sample at temperature 1 with
no top-k / top-p over the full vocabulary, EOS disabled, so every row generates exactly
`--new-tokens` tokens. Ours: `mopd_jax.sampling.sample` (prefill each prompt once, repeat the
cache G times, decode in a jitted while loop), timed end to end including the copy of tokens
and log-probs to the host; compilation is excluded (one untimed call per shape).
HF: `model.generate(..., num_return_sequences=G)`, which prefills all B*G rows; one untimed
8-token warm-up on the same batch. Runs alternate (ours, HF, ours, HF, ...) so both see the
same machine load; the medians of `--runs` runs are reported.

On a CPU shared with other jobs, torch's OpenMP threads can spin against the other
load (here 2 threads decoded 5-15x slower than 1); `--torch-threads auto` (default) gives HF
the faster of 1 thread and torch's default, measured on 3 decode steps of the real batch.

ms/step is the decode phase only: ours (total - median prefill) / (new_tokens - 1), with the
prefill (`_prefill`, B x L tokens) timed on its own; HF from per-step timestamps taken by a
stopping criterion (first to last step). float32 on CPU, bfloat16 on GPU (both sides).
`--profile DIR` traces one more call of ours per shape and prints the device ops that took
the most time (experiments/profile_summary.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
  p.add_argument("--shapes", default=None, help="comma-separated BxG (default 8x8,32x8)")
  p.add_argument("--prompt-len", type=int, default=None, help="default 64 (CPU), 128 (GPU)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64 (CPU), 256 (GPU)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--no-hf", action="store_true", help="only time the JAX sampler")
  p.add_argument("--profile", default=None, help="trace one more call of ours per shape into this directory")
  p.add_argument("--torch-threads", default="auto",
                 help="CPU threads for torch: an int, 'default' (torch's choice), or 'auto': "
                      "whichever of 1 and torch's default decodes faster here")
  return p.parse_args(argv)


def _hf_model(config, device: str):
  import warnings

  import torch
  import transformers
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

  transformers.logging.set_verbosity_error()
  warnings.filterwarnings("ignore", module="transformers")
  warnings.filterwarnings("ignore", module="torch")

  if config.family not in ("llama", "qwen2"):
    raise SystemExit(f"HF reference implemented for llama/qwen2 presets, not {config.family}")
  common = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
      tie_word_embeddings=config.tie_embeddings,
      max_position_embeddings=config.max_position_embeddings)
  if config.family == "llama":
    model = LlamaForCausalLM(LlamaConfig(head_dim=config.head_dim, **common))
  else:
    model = Qwen2ForCausalLM(Qwen2Config(**common))
  torch.manual_seed(0)
  dtype = torch.bfloat16 if device == "gpu" else torch.float32
  return model.to("cuda" if device == "gpu" else "cpu", dtype).eval()


def _time_hf(model, prompts, num_samples: int, new_tokens: int, device: str) -> tuple[float, float]:
  """(seconds, ms per decode step) of one `generate` call."""
  import torch
  from transformers import StoppingCriteria, StoppingCriteriaList

  stamps: list[float] = []

  class Clock(StoppingCriteria):  # called once per generated token; never stops
    def __call__(self, input_ids, scores, **kwargs):
      if device == "gpu":
        torch.cuda.synchronize()
      stamps.append(time.perf_counter())
      return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

  ids = torch.tensor(prompts, device=model.device)
  if device == "gpu":
    torch.cuda.synchronize()
  start = time.perf_counter()
  with torch.no_grad():
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
        top_p=1.0, top_k=0, max_new_tokens=new_tokens, num_return_sequences=num_samples,
        eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([Clock()]))
  if device == "gpu":
    torch.cuda.synchronize()
  seconds = time.perf_counter() - start
  assert out.shape == (len(prompts) * num_samples, len(prompts[0]) + new_tokens), out.shape
  step_ms = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) * 1e3
  return seconds, step_ms


def _pick_torch_threads(model, rows: int, choice: str) -> int:
  import torch

  default = torch.get_num_threads()
  if choice != "auto":
    return default if choice == "default" else int(choice)

  def step_ms(threads: int) -> float:
    torch.set_num_threads(threads)
    ids = torch.ones((rows, 16), dtype=torch.long)
    with torch.no_grad():
      cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
      start = time.perf_counter()
      for _ in range(3):
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    return (time.perf_counter() - start) / 3 * 1e3

  timed = {t: step_ms(t) for t in sorted({1, default})}
  print(f"# torch threads probe (ms per decode step, {rows} rows): {timed}")
  return min(timed, key=timed.get)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:  # torch shares the GPU: keep jax from preallocating 75% of its memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  import jax
  import numpy as np
  from flax import nnx

  from mopd_jax import sampling
  from mopd_jax.models import get_preset, init_model

  device = "gpu" if jax.default_backend() == "gpu" else "cpu"
  if args.device == "gpu" and device != "gpu":
    raise SystemExit("--device gpu: jax sees no GPU")
  shapes = args.shapes or "8x8,32x8"
  prompt_len = args.prompt_len or (128 if device == "gpu" else 64)
  new_tokens = args.new_tokens or (256 if device == "gpu" else 64)
  dtype = "bfloat16" if device == "gpu" else "float32"
  config = get_preset(args.preset).replace(param_dtype=dtype, dtype=dtype)
  graphdef, state = nnx.split(init_model(config, seed=0))
  hf = None if args.no_hf else _hf_model(config, device)

  print(f"# bench_sampler: {args.preset} ({config.num_params() / 1e6:.0f}M params, random), {dtype}, "
        f"{device} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}")
  print(f"# prompt {prompt_len} + {new_tokens} new tokens, EOS disabled, temperature 1, "
        f"median of {args.runs} runs")
  if hf is not None:
    import torch
    import transformers
    if device == "cpu":
      rows = max(b * g for b, g in (map(int, s.lower().split("x")) for s in shapes.split(",")))
      torch.set_num_threads(_pick_torch_threads(hf, rows, args.torch_threads))
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}")
  print(f"{'shape':>6} {'rows':>5} | {'ours s':>8} {'tok/s':>8} {'ms/step':>8} {'prefill ms':>10} | "
        f"{'HF s':>8} {'tok/s':>8} {'ms/step':>8} | {'speedup':>7}")
  rng = np.random.RandomState(0)
  for shape in shapes.split(","):
    b, g = (int(x) for x in shape.lower().split("x"))
    prompts = rng.randint(1, config.vocab_size, (b, prompt_len)).tolist()
    params = sampling.SamplingParams(
        temperature=1.0, max_new_tokens=new_tokens, stop_token_ids=(),
        prompt_buckets=(prompt_len,), generation_buckets=(new_tokens,))

    def ours(seed: int) -> float:
      start = time.perf_counter()
      res = sampling.sample((graphdef, state), prompts, num_samples=g, rng=jax.random.key(seed),
                            sampling_params=params)
      seconds = time.perf_counter() - start
      assert (res.lengths == new_tokens).all() and res.decode_steps == new_tokens
      return seconds

    def prefill() -> float:
      tokens, lengths = np.asarray(prompts, np.int32), np.full((b,), prompt_len, np.int32)
      start = time.perf_counter()
      jax.block_until_ready(sampling._prefill(
          graphdef, state, tokens, lengths, num_samples=g, generation_len=new_tokens, mesh=None))
      return time.perf_counter() - start

    ours(seed=100)  # compile
    prefill()
    if hf is not None:
      # Warm-up on the full batch: on an H100 a 1-prompt warm-up left transformers' first timed
      # run 3-4x slower than its later ones (experiments/README.md, "GPU runs").
      _time_hf(hf, prompts, g, 8, device)
    ours_s, hf_s, hf_step = [], [], []
    for run in range(args.runs):
      ours_s.append(ours(seed=run))
      if hf is not None:
        seconds, step_ms = _time_hf(hf, prompts, g, new_tokens, device)
        hf_s.append(seconds)
        hf_step.append(step_ms)
      print(f"#   {shape} run {run}: ours {ours_s[-1]:.2f} s" +
            (f", HF {hf_s[-1]:.2f} s" if hf_s else ""), flush=True)
    prefill_s = statistics.median(prefill() for _ in range(args.runs))
    if args.profile:
      from experiments.profile_summary import profile_call
      profile_call(os.path.join(args.profile, shape), lambda: ours(seed=1000), steps=new_tokens)
    t = statistics.median(ours_s)
    rows_tokens = b * g * new_tokens
    line = (f"{shape:>6} {b * g:>5} | {t:8.2f} {rows_tokens / t:8.0f} "
            f"{(t - prefill_s) / (new_tokens - 1) * 1e3:8.1f} {prefill_s * 1e3:10.0f} | ")
    if hf_s:
      th = statistics.median(hf_s)
      line += f"{th:8.2f} {rows_tokens / th:8.0f} {statistics.median(hf_step):8.1f} | {th / t:6.1f}x"
    else:
      line += f"{'-':>8} {'-':>8} {'-':>8} | {'-':>7}"
    print(line, flush=True)


if __name__ == "__main__":
  sys.exit(main())
