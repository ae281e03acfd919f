"""MOPD train step throughput and MFU: random weights of a preset shape, synthetic full rows.

    python experiments/bench_train_step.py [--preset llama-3.2-1b] [--rows 8] [--seq 2048]
        [--prompt N] [--teacher-prompt N] [--dtype bfloat16|float32] [--param-dtype ...]
        [--remat] [--attention-chunk 512] [--attention-impl xla|cudnn] [--chunk-size 512] [--runs 5]
        [--warmup 1] [--peak-tflops X] [--torch-baseline] [--compile-only] [--json out.json]
        [--profile DIR]

What is timed: one call of `make_train_step` with the default `StepConfig` (MOPD distill loss,
top-k 100 with a tail category, alpha 0.5, EMA teacher): student forward + backward on
[plain prompt | response], teacher forward on [peer-context prompt | same response] (no
gradient), global-norm clipping + AdamW, EMA teacher update. jit with the states donated (as
`jit_train_step` does), compiled ahead of time; each timed call ends in block_until_ready.

Shapes. `--seq` is the student row length, prompt + response. Defaults: prompt = seq // 4,
response = seq - prompt (2048 -> 512 + 1536); teacher prompt = 2 x the student prompt (the
peer context adds tokens), teacher row = teacher prompt + the same response (1024 + 1536 =
2560). Every row is full (no padding): every token is real work. The StepConfig group size
is gcd(rows, 8) (it only shapes the alignment-AUC metric).

Model FLOPs per step: `mopd_jax.flops.train_step_flops` (the formula is in that module's
docstring; counted once: no rematerialisation, no masked-out work skipped). Extra hardware work
not in the model FLOPs (printed separately): the chunked loss recomputes the student logits in
the backward pass, and --remat recomputes every layer's forward.
MFU = model FLOPs / step time / peak (989 TFLOP/s dense bf16 on H100/H200, auto; else
--peak-tflops). XLA's own count (`compiled.cost_analysis()`) is printed for comparison; it
counts a while-loop body once, so the lax.map over loss chunks is under-counted.

`--profile DIR` traces one more step with `jax.profiler` after the timed runs and prints the
device ops that took the most time (experiments/profile_summary.py reads the trace again).

Memory: on GPU the device's peak_bytes_in_use; everywhere the compiled executable's
memory_analysis (arguments, outputs, aliased, temporaries) and the state sizes.
`--compile-only` builds abstract states (no weights allocated) and prints only that: use it
to size shapes that do not fit the machine.

`--torch-baseline`: transformers LlamaForCausalLM (SDPA attention, eager) doing the same work
on the same tokens in the same dtype: a no_grad teacher forward on the teacher rows, the
student forward on the student rows with logits kept for the response positions only
(`logits_to_keep`), the same top-k-100-with-tail alpha-0.5 JSD on full [B, R, V] log-probs,
backward, global-norm clipping, AdamW.step, and an EMA lerp of a teacher copy. It runs
before JAX touches the accelerator (JAX preallocates most of the GPU's memory) and frees its
memory first; timings of the two are in the same process, one after the other.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Optional

import numpy as np

from mopd_jax.batching import RolloutRows, TrainBatch, build_train_batch, teacher_rows
from mopd_jax.flops import TrainShape as Shape, train_step_flops as model_flops
from mopd_jax.models import ModelConfig, get_preset

H100_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
GIB = 1024 ** 3


def synthetic_batch(cfg: ModelConfig, shape: Shape, group_size: int, seed: int = 0) -> TrainBatch:
  """Full rows of random tokens (numpy leaves), through the real host batching."""
  rng = np.random.default_rng(seed)
  tokens = lambda n: rng.integers(1, cfg.vocab_size, n).tolist()
  b, r = shape.rows, shape.response
  rewards = rng.integers(0, 2, b).astype(float)
  rows = RolloutRows(
      student_prompts=[tokens(shape.prompt) for _ in range(b)],
      teacher_prompts=[tokens(shape.teacher_prompt) for _ in range(b)],
      responses=[tokens(r) for _ in range(b)],
      # About the log-prob of a near-uniform random-weight model: importance weights near 1.
      sampler_logprobs=[(-math.log(cfg.vocab_size) + 0.1 * rng.standard_normal(r)).tolist() for _ in range(b)],
      distill_mask=[1.0] * b, rewards=list(rewards), success=list(rewards > 0.5),
      group_ids=[i // group_size for i in range(b)])
  return build_train_batch(
      rows, pad_id=0, prompt_buckets=(shape.prompt,), teacher_prompt_buckets=(shape.teacher_prompt,),
      response_buckets=(r,))


def load_note() -> str:
  one, five, _ = os.getloadavg()
  return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def max_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def fmt_flops(n: float) -> str:
  return f"{n / 1e12:.3f} T" if n >= 1e11 else f"{n / 1e9:.3f} G"


def fmt_bytes(n: Optional[float]) -> str:
  return "n/a" if n is None else f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------
# PyTorch baseline
# ---------------------------------------------------------------------------------------


def torch_baseline(cfg: ModelConfig, batch: TrainBatch, shape: Shape, dtype: str, args) -> dict[str, Any]:
  import torch
  import transformers

  if cfg.family != "llama":
    raise SystemExit(f"--torch-baseline supports the llama family only, got {cfg.family!r}")
  rope_scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                        high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
  hf_config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings)
  hf_config._attn_implementation = "sdpa"
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch_dtype = getattr(torch, dtype)
  torch.manual_seed(0)
  with device:
    student = transformers.LlamaForCausalLM(hf_config).to(torch_dtype).train()
  if args.remat:
    student.gradient_checkpointing_enable()
  teacher = copy.deepcopy(student).eval().requires_grad_(False)
  s_params = [p for p in student.parameters()]
  t_params = [p for p in teacher.parameters()]
  opt = torch.optim.AdamW(s_params, lr=1e-6, weight_decay=0.01, foreach=True)
  s_tok = torch.as_tensor(np.asarray(batch.student_tokens), dtype=torch.long, device=device)
  t_tok = torch.as_tensor(np.asarray(teacher_rows(batch)[0]), dtype=torch.long, device=device)
  r, k, alpha = shape.response, 100, 0.5

  def tail(x):
    return torch.log(-torch.expm1(torch.logsumexp(x, -1).clamp(max=-torch.finfo(x.dtype).eps)))

  def loss_fn(s_logits, t_logits):
    s = torch.log_softmax(s_logits.float(), -1)
    t = torch.log_softmax(t_logits.float(), -1)
    ids = s.detach().topk(k, -1).indices
    s_k, t_k = s.gather(-1, ids), t.gather(-1, ids)
    s_c = torch.cat([s_k, tail(s_k)[..., None]], -1)
    t_c = torch.cat([t_k, tail(t_k)[..., None]], -1)
    log_m = torch.logaddexp(math.log1p(-alpha) + s_c, math.log(alpha) + t_c)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)
    return ((1 - alpha) * kl(s_c, log_m) + alpha * kl(t_c, log_m)).mean()

  def step():
    with torch.no_grad():
      # Positions P-1 .. P+R-2 predict the response: the last R+1 logits minus the final one.
      t_logits = teacher(input_ids=t_tok, use_cache=False, logits_to_keep=r + 1).logits[:, :-1]
    s_logits = student(input_ids=s_tok, use_cache=False, logits_to_keep=r + 1).logits[:, :-1]
    loss = loss_fn(s_logits, t_logits)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s_params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(t_params, s_params, 0.05)
    if cuda:
      torch.cuda.synchronize()
    return float(loss.detach())

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(args.warmup + args.runs):
    start = time.perf_counter()
    loss = step()
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() if cuda else None
  out = dict(times_s=times, median_s=statistics.median(times), min_s=min(times), loss=loss, peak_bytes=peak,
             device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
             torch_version=torch.__version__, transformers_version=transformers.__version__,
             threads=torch.get_num_threads())
  return out


def release_torch_memory() -> None:
  """After `torch_baseline` returned (its models are garbage): hand the GPU memory back
  before JAX allocates its pool."""
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------


def build_states(cfg: ModelConfig, step_cfg, abstract: bool):
  import jax
  from flax import nnx

  from mopd_jax.models import abstract_model, init_model
  from mopd_jax.train_step import init_teacher_state, init_train_state, make_optimizer

  opt, lr_fn = make_optimizer(1e-6, weight_decay=0.01, grad_clip=1.0)
  if abstract:
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    state = jax.eval_shape(lambda p: init_train_state(p, opt), params)
    teacher = jax.eval_shape(lambda p: init_teacher_state(step_cfg, p), params)
  else:
    graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
    state = init_train_state(params, opt)
    teacher = init_teacher_state(step_cfg, params)
  return graphdef, opt, lr_fn, state, teacher


def tree_bytes(tree) -> int:
  import jax
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_report(compiled) -> dict[str, Optional[int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    m = None
  if m is None:
    return {}
  get = lambda name: getattr(m, name, None)
  out = dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
             alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
             code=get("generated_code_size_in_bytes"), peak=get("peak_memory_in_bytes"))
  if None not in (out["argument"], out["output"], out["alias"], out["temp"]):
    out["live_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def xla_flops(compiled) -> Optional[float]:
  try:
    ca = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return None if not ca or "flops" not in ca else float(ca["flops"])


def run_jax(cfg: ModelConfig, shape: Shape, batch_np: TrainBatch, args) -> dict[str, Any]:
  import jax

  import dataclasses

  from mopd_jax import losses, methods
  from mopd_jax.train_step import StepConfig, make_train_step

  distill = losses.DistillConfig() if args.chunk_size is None else losses.DistillConfig(chunk_size=args.chunk_size)
  step_cfg = StepConfig(method=dataclasses.replace(methods.get("mopd"), distill=distill),
                        group_size=math.gcd(shape.rows, 8))
  t0 = time.perf_counter()
  graphdef, opt, lr_fn, state, teacher = build_states(cfg, step_cfg, abstract=args.compile_only)
  init_s = time.perf_counter() - t0
  param_bytes = tree_bytes(state.params)
  state_bytes = dict(params=param_bytes, opt_state=tree_bytes(state.opt_state), teacher=tree_bytes(teacher.params))
  print(f"states{' (abstract)' if args.compile_only else ''}: params {fmt_bytes(param_bytes)}, "
        f"AdamW moments {fmt_bytes(state_bytes['opt_state'])}, teacher copy {fmt_bytes(state_bytes['teacher'])}; "
        f"grads add {fmt_bytes(param_bytes)} inside the step"
        + ("" if args.compile_only else f"; init {init_s:.1f} s"))

  step = make_train_step(graphdef, opt, step_cfg, learning_rate_fn=lr_fn)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  if args.compile_only:
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch_np)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  else:
    batch = jax.device_put(batch_np)
    rng = jax.random.key(0)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, teacher, batch, rng)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = memory_report(compiled)
  result: dict[str, Any] = dict(lower_s=lower_s, compile_s=compile_s, state_bytes=state_bytes, memory_analysis=mem,
                                xla_flops=xla_flops(compiled), step_config=repr(step_cfg))
  if args.compile_only:
    return result
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  if limit and mem.get("live_estimate", 0) > limit:
    raise SystemExit(f"the compiled step needs about {fmt_bytes(mem['live_estimate'])}, the device has "
                     f"{fmt_bytes(limit)}: try --remat, fewer --rows or a shorter --seq")

  times, metrics = [], None
  for i in range(args.warmup + args.runs):
    start = time.perf_counter()
    state, teacher, metrics = compiled(state, teacher, batch, rng)
    jax.block_until_ready((state, teacher, metrics))
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  result.update(times_s=times, median_s=statistics.median(times), min_s=min(times),
                loss=float(metrics.loss), grad_norm=float(metrics.grad_norm),
                update_applied=float(metrics.update_applied), optimizer_steps=int(state.step))
  if args.profile:
    from experiments.profile_summary import profile_call
    state, teacher, metrics = profile_call(args.profile, lambda: compiled(state, teacher, batch, rng))
  stats = jax.devices()[0].memory_stats() or {}
  result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  result["device_bytes_limit"] = stats.get("bytes_limit")
  result["max_rss_gib"] = max_rss_gib()
  del state, teacher, batch, compiled
  return result


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama-3.2-1b")
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048, help="student row = prompt + response")
  p.add_argument("--prompt", type=int, default=None, help="student prompt length (default seq // 4)")
  p.add_argument("--teacher-prompt", type=int, default=None, help="teacher prompt length (default 2 x prompt)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                 help="compute dtype (default bfloat16 on an accelerator, float32 on CPU)")
  p.add_argument("--param-dtype", choices=("bfloat16", "float32"), default=None,
                 help="parameter (and AdamW moment, teacher) dtype; default = --dtype")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
  p.add_argument("--attention-chunk", type=int, default=0,
                 help="attention over blocks of this many queries (ModelConfig.attention_chunk; 0 = dense)")
  p.add_argument("--attention-impl", choices=("xla", "cudnn"), default="xla",
                 help="ModelConfig.attention_impl: cudnn = fused flash attention (NVIDIA GPUs)")
  p.add_argument("--chunk-size", type=int, default=None, help="loss chunk (default DistillConfig's)")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help=f"device peak for MFU (auto {H100_BF16_TFLOPS:.0f} for bf16 on H100/H200)")
  p.add_argument("--torch-baseline", action="store_true")
  p.add_argument("--compile-only", action="store_true", help="abstract states: compile and report memory only")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--profile", default=None, help="trace one extra step into this directory and summarise it")
  return p.parse_args(argv)


def accelerator_present(args) -> bool:
  """Without initialising JAX's GPU client when torch must run first (JAX preallocates)."""
  if args.torch_baseline:
    import torch
    return torch.cuda.is_available()
  import jax
  return jax.default_backend() != "cpu"


def main(argv=None) -> None:
  args = parse_args(argv)
  accel = accelerator_present(args)
  dtype = args.dtype or ("bfloat16" if accel else "float32")
  param_dtype = args.param_dtype or dtype
  cfg = get_preset(args.preset).replace(dtype=dtype, param_dtype=param_dtype, remat=args.remat,
                                        attention_chunk=args.attention_chunk, attention_impl=args.attention_impl)
  prompt = args.prompt if args.prompt is not None else args.seq // 4
  shape = Shape(rows=args.rows, prompt=prompt,
                teacher_prompt=args.teacher_prompt if args.teacher_prompt is not None else 2 * prompt,
                response=args.seq - prompt)
  if not 0 < shape.prompt < args.seq:
    raise SystemExit(f"--prompt must be in (0, seq={args.seq}), got {shape.prompt}")
  flops = model_flops(cfg, shape)
  student_tokens, teacher_tokens = shape.rows * shape.student_len, shape.rows * shape.teacher_len
  print(f"MOPD train step bench: {args.preset} ({cfg.num_params() / 1e9:.3f} B params, {cfg.num_layers} layers), "
        f"params {param_dtype}, compute {dtype}, remat {cfg.remat}, attention_chunk {cfg.attention_chunk}, attention_impl {cfg.attention_impl}")
  print(f"rows {shape.rows}: student {shape.prompt} prompt + {shape.response} response = {shape.student_len}, "
        f"teacher {shape.teacher_prompt} + {shape.response} = {shape.teacher_len}; "
        f"{student_tokens} student + {teacher_tokens} teacher tokens per step")
  print(f"model FLOPs per step: {fmt_flops(flops.model)} (student fwd+bwd {fmt_flops(flops.student)}, "
        f"teacher fwd {fmt_flops(flops.teacher)}); recomputation adds {fmt_flops(flops.recompute)}")
  print(f"host: {platform.node()} {load_note()}")

  batch = synthetic_batch(cfg, shape, math.gcd(shape.rows, 8))
  torch_result = None
  if args.torch_baseline and not args.compile_only:
    print(f"torch baseline (transformers eager, SDPA, {dtype}): {args.warmup} warm-up + {args.runs} runs ...")
    sys.stdout.flush()
    torch_result = torch_baseline(cfg, batch, shape, dtype, args)
    release_torch_memory()

  import jax  # first JAX device use: after the torch baseline has released the accelerator
  device = jax.devices()[0]
  kind = device.device_kind
  peak = args.peak_tflops
  if peak is None and dtype == "bfloat16" and ("H100" in kind or "H200" in kind):
    peak = H100_BF16_TFLOPS
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {kind} x{len(jax.devices())}"
        + (f", peak {peak:.0f} TFLOP/s" if peak else ", peak unknown (--peak-tflops for MFU)"))
  sys.stdout.flush()

  res = run_jax(cfg, shape, batch, args)
  mem = res["memory_analysis"]
  print(f"compile: lower {res['lower_s']:.1f} s, lower + compile {res['compile_s']:.1f} s")
  if mem:
    print(f"compiled memory_analysis: arguments {fmt_bytes(mem['argument'])}, outputs {fmt_bytes(mem['output'])}, "
          f"aliased (donated) {fmt_bytes(mem['alias'])}, temporaries {fmt_bytes(mem['temp'])}"
          + (f", peak {fmt_bytes(mem['peak'])}" if mem.get("peak") else "")
          + (f"; live estimate (args + outs - aliased + temps) {fmt_bytes(mem['live_estimate'])}"
             if "live_estimate" in mem else ""))
  if res["xla_flops"] is not None:
    print(f"XLA cost_analysis flops: {fmt_flops(res['xla_flops'])} "
          f"(analytic model {fmt_flops(flops.model)}, + recompute {fmt_flops(flops.model + flops.recompute)}; "
          f"XLA counts a loop body once)")

  summary: dict[str, Any] = dict(
      preset=args.preset, rows=shape.rows, seq=args.seq, prompt=shape.prompt, teacher_prompt=shape.teacher_prompt,
      response=shape.response, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat,
      attention_chunk=cfg.attention_chunk, attention_impl=cfg.attention_impl,
      chunk_size=args.chunk_size, device=kind, backend=jax.default_backend(), jax_version=jax.__version__,
      model_flops=flops.model, student_flops=flops.student, teacher_flops=flops.teacher,
      recompute_flops=flops.recompute, peak_tflops=peak, jax=res, torch=torch_result, load=load_note())
  if args.compile_only:
    line = (f"SUMMARY {args.preset} {shape.rows}x{args.seq} {dtype}/{param_dtype} remat={cfg.remat} attention_chunk={cfg.attention_chunk} attention={cfg.attention_impl} compile-only: "
            f"compile {res['compile_s']:.1f} s, states {fmt_bytes(sum(res['state_bytes'].values()))}, "
            f"temps {fmt_bytes(mem.get('temp'))}, live estimate {fmt_bytes(mem.get('live_estimate'))}")
  else:
    med, best = res["median_s"], res["min_s"]
    tflops = flops.model / med / 1e12
    summary.update(tokens_per_s=student_tokens / med, tflops=tflops, mfu=(tflops / peak) if peak else None)
    print(f"jax step: median {med * 1e3:.1f} ms, min {best * 1e3:.1f} ms over {len(res['times_s'])} runs "
          f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in res['times_s'])} ms; {args.warmup} warm-up)")
    print(f"  {student_tokens / med:,.0f} student tok/s ({(student_tokens + teacher_tokens) / med:,.0f} incl. teacher), "
          f"{tflops:.2f} model TFLOP/s" + (f", MFU {100 * tflops / peak:.1f}%" if peak else "")
          + f"; loss {res['loss']:.4g}, grad norm {res['grad_norm']:.4g}, applied {res['update_applied']:.0f}")
    if res.get("device_peak_bytes") is not None:
      print(f"  device peak memory {fmt_bytes(res['device_peak_bytes'])} of {fmt_bytes(res['device_bytes_limit'])}")
    print(f"  process max RSS {res['max_rss_gib']:.2f} GiB" + (" (incl. the torch baseline)" if torch_result else ""))
    line = (f"SUMMARY {args.preset} {shape.rows}x{args.seq} {dtype}/{param_dtype} remat={cfg.remat} attention_chunk={cfg.attention_chunk} attention={cfg.attention_impl} on {kind}: "
            f"step {med * 1e3:.1f} ms (min {best * 1e3:.1f}), {student_tokens / med:,.0f} tok/s, "
            f"{tflops:.2f} TFLOP/s" + (f", MFU {100 * tflops / peak:.1f}%" if peak else "")
            + f", compile {res['compile_s']:.1f} s")
    if torch_result is not None:
      t_med = torch_result["median_s"]
      t_tflops = flops.model / t_med / 1e12
      print(f"torch step: median {t_med * 1e3:.1f} ms, min {torch_result['min_s'] * 1e3:.1f} ms "
            f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in torch_result['times_s'])} ms), "
            f"{t_tflops:.2f} model TFLOP/s" + (f", MFU {100 * t_tflops / peak:.1f}%" if peak else "")
            + f", loss {torch_result['loss']:.4g}, {torch_result['threads']} threads"
            + (f", peak memory {fmt_bytes(torch_result['peak_bytes'])}" if torch_result["peak_bytes"] else ""))
      summary["torch_over_jax_time"] = t_med / med
      line += f", torch {t_med * 1e3:.1f} ms -> jax speedup {t_med / med:.2f}x"
  print(f"host after: {load_note()}")
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
