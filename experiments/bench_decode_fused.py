"""Decode with fused vs separate q/k/v and gate/up projections (`ModelConfig.fused_projections`).

    python experiments/bench_decode_fused.py                 # SmolLM2-135M shape, 64 rows, float32 on CPU
    python experiments/bench_decode_fused.py --quick         # fewer tokens: a smoke run (still 5 runs)
    python experiments/bench_decode_fused.py --device gpu    # bfloat16

One process, the same random weights in both layouts (`mopd_jax.weights.relayout`). Each layout
prefills 64 rows once (a jitted call with a fresh cache); the timed call is the jitted greedy
decode loop on that KV cache (`lax.fori_loop` over one-token model calls, the cache donated),
`--new-tokens` steps per row: its median over `--runs` runs (after one warm-up call with the
compile), runs alternating between the layouts, divided by the steps. The model's decode step
alone: the sampler adds the same token-drawing ops to both. Greedy, so both layouts should
produce the same tokens (printed).

Where a device is missing, the program still shows what fusion changes: the ops of the
compiled one-token decode step on the same cache, per layer, as XLA launches them (top-level
ops, fusions named as XLA names them; on a GPU each is a kernel launch) and the matmuls among
them (`dot`, inside fusions too, and matmul custom calls). "scanned": the body of the layer
loop, as decode runs it; "unrolled": the layers unrolled, depth 2 minus depth 1.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import statistics
import sys

# Ops that launch nothing: they name, pack or unpack buffers.
_FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                       "partition-id", "replica-id", "opt-barrier"})


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=None, help="default 32 (CPU), 256 (GPU); --quick: 8")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="a smoke run: 16 prompt + 8 new tokens")
  return p.parse_args(argv)


def hlo_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, the ENTRY computation's name) of an HLO dump."""
  computations, entry, current = {}, "", None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif current and line.strip() not in ("", "}"):
      computations[current].append(line.strip())
  return computations, entry


def _opcode(line: str) -> str | None:
  """The opcode of one HLO instruction (`[ROOT] %name = TYPE opcode(operands), attributes`)."""
  _, eq, rest = line.partition(" = ")
  if not eq:
    return None
  if rest.startswith("("):  # a tuple type: skip its balanced parentheses
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(" ", 1)[1] if " " in rest else ""
  match = re.match(r"\s*([\w\-]+)\(", rest)
  return match.group(1) if match else None


def _callees(line: str, keys: tuple[str, ...]) -> list[str]:
  names = [c for key in keys for c in re.findall(rf"\b{key}=%?([\w.\-]+)", line)]
  for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
    names += [b.strip().lstrip("%") for b in group.split(",")]
  return names


_CONTROL = ("body", "condition", "true_computation", "false_computation")


def _walk(computations: dict[str, list[str]], root: str, follow):
  """(line, opcode) of every instruction in `root` and in the computations its instructions
  name by the keys `follow(opcode)` returns, transitively."""
  todo, seen = [root], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]:
      op = _opcode(line)
      if op is not None:
        yield line, op
        todo += _callees(line, follow(op))


def launched_ops(computations: dict[str, list[str]], root: str) -> collections.Counter:
  """{op: count} launched from `root` and the control flow it runs (loop bodies, branches,
  calls), not from inside fusions: fusions by name (`dynamic-slice_bitcast_fusion`), the rest by opcode."""
  ops = collections.Counter()
  for line, op in _walk(computations, root, lambda op: _CONTROL + (("to_apply",) if op == "call" else ())):
    if op == "fusion":
      name = re.sub(r"(\.\d+)+$", "", line.split(" = ", 1)[0].split()[-1].lstrip("%"))
      ops[name if "fusion" in name else f"{name} (fusion)"] += 1
    elif op not in _FREE_OPS:
      ops[op] += 1
  return ops


def matmuls(computations: dict[str, list[str]], root: str) -> int:
  """`dot` ops (fused or not) and matmul custom calls reachable from `root`."""
  return sum(op == "dot" or (op == "custom-call" and "matmul" in line.lower())
             for line, op in _walk(computations, root, lambda op: _CONTROL + ("calls", "to_apply")))


def per_layer_ops(config, rows: int, cache_len: int) -> dict[str, dict]:
  """What one layer launches in the compiled one-token decode step: "scanned", the body of the
  layer loop as decode runs it (loop bookkeeping included); "unrolled", the layers unrolled,
  depth 2 minus depth 1 (the layer alone)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mopd_jax.models import KVCache, abstract_model

  def compiled(cfg):
    graphdef, state = nnx.split(abstract_model(cfg))
    tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, rows, cache_len))
    step = lambda state, tokens, cache: nnx.merge(graphdef, state)(tokens, tokens, jnp.ones_like(tokens), cache).logits
    return hlo_computations(jax.jit(step).lower(state, tokens, cache).compile().as_text())

  computations, entry = compiled(config.replace(scan_layers=True))
  [body] = [c for line in computations[entry] if _opcode(line) == "while" for c in _callees(line, ("body",))]
  summary = lambda ops, dots: dict(
      kernels=sum(ops.values()), fusions=sum(n for op, n in ops.items() if "fusion" in op), matmuls=dots, by_op=ops)
  out = {"scanned": summary(launched_ops(computations, body), matmuls(computations, body))}
  counts = []
  for depth in (1, 2):
    computations, entry = compiled(config.replace(num_layers=depth, scan_layers=False))
    counts.append((launched_ops(computations, entry), matmuls(computations, entry)))
  (ops1, dots1), (ops2, dots2) = counts
  out["unrolled"] = summary(ops2 - ops1, dots2 - dots1)
  return out


def make_decode(model, rows: int, prompt_len: int, new_tokens: int):
  """`run() -> (seconds, tokens [rows, new_tokens])`: greedy decode steps from a copy of one prefilled cache."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from experiments.bench_forward import timed
  from mopd_jax.models import KVCache, positions_from_segments

  config = model.config
  graphdef, state = nnx.split(model)
  prompts = jnp.asarray(np.random.RandomState(0).randint(1, config.vocab_size, (rows, prompt_len)), jnp.int32)
  segments = jnp.ones_like(prompts)

  @jax.jit
  def prefill(state):
    m = nnx.merge(graphdef, state)
    out = m(prompts, positions_from_segments(segments), segments, KVCache.empty(config, rows, prompt_len + new_tokens),
            fresh_cache=True)
    return out.cache, jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

  @jax.jit(donate_argnums=1)
  def decode(state, cache, first):
    m = nnx.merge(graphdef, state)
    ones = jnp.ones((rows, 1), jnp.int32)

    def step(i, carry):
      cache, last, out = carry
      res = m(last[:, None], ones * (prompt_len + i), ones, cache)
      token = jnp.argmax(res.logits[:, 0], axis=-1).astype(jnp.int32)
      return res.cache, token, out.at[:, i].set(token)

    tokens = jnp.zeros((rows, new_tokens), jnp.int32)
    cache, _, tokens = jax.lax.fori_loop(0, new_tokens, step, (cache, first, tokens))
    return tokens, cache  # the cache returned: the donated one is updated in place, as in the sampler

  cache, first = prefill(state)

  def run():
    fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))  # the call donates it
    out = []
    seconds = timed(lambda: out.append(jax.block_until_ready(decode(state, fresh, first))))
    return seconds, np.asarray(out[0][0])

  return run


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import numpy as np

  from mopd_jax.models import get_preset, init_model
  from mopd_jax.weights import relayout

  device = "gpu" if jax.default_backend() == "gpu" else "cpu"
  if args.device == "gpu" and device != "gpu":
    raise SystemExit("--device gpu: jax sees no GPU")
  prompt_len = 16 if args.quick else args.prompt_len
  new_tokens = 8 if args.quick else (args.new_tokens or (256 if device == "gpu" else 32))
  dtype = "bfloat16" if device == "gpu" else "float32"
  base = get_preset(args.preset).replace(param_dtype=dtype, dtype=dtype)
  print(f"# bench_decode_fused: {args.preset} ({base.num_params() / 1e6:.0f}M params, random), {dtype}, "
        f"{device} ({jax.devices()[0].device_kind}), jax {jax.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}")
  print(f"# {args.rows} rows, prompt {prompt_len} + {new_tokens} greedy decode steps, median of {args.runs} runs")

  layouts = ("unfused", "fused")
  fused = init_model(base.replace(fused_projections=True), seed=0)
  models = {"fused": fused, "unfused": relayout(fused, base.replace(fused_projections=False))}
  ops = {name: per_layer_ops(models[name].config, args.rows, prompt_len + new_tokens) for name in layouts}
  runs = {name: make_decode(models[name], args.rows, prompt_len, new_tokens) for name in layouts}
  tokens = {name: runs[name]()[1] for name in layouts}  # warm-up, with the compile
  times = {name: [] for name in layouts}
  for k in range(args.runs):
    for name in layouts:
      times[name].append(runs[name]()[0])
    print(f"#   run {k}: " + ", ".join(f"{name} {times[name][-1] * 1e3:.0f} ms" for name in layouts), flush=True)

  print(f"{'layout':>8} {'ms/step':>8} {'tok/s':>8} | per layer, scanned: kernels fusions matmuls | "
        f"unrolled: kernels fusions matmuls")
  step_ms = {}
  for name in layouts:
    step_ms[name] = statistics.median(times[name]) / new_tokens * 1e3
    scanned, unrolled = (" ".join(f"{o[k]:7d}" for k in ("kernels", "fusions", "matmuls"))
                         for o in (ops[name]["scanned"], ops[name]["unrolled"]))
    print(f"{name:>8} {step_ms[name]:8.2f} {args.rows / step_ms[name] * 1e3:8.0f} | {scanned:>43} | {unrolled:>33}")
  for name in layouts:
    print(f"# {name}, the scanned layer's ops: {dict(ops[name]['scanned']['by_op'].most_common())}")
  same = np.array_equal(tokens["fused"], tokens["unfused"])
  print(f"fused / unfused decode step time: {step_ms['fused'] / step_ms['unfused']:.3f} "
        f"(speedup {step_ms['unfused'] / step_ms['fused']:.2f}x); same greedy tokens: {same}")


if __name__ == "__main__":
  sys.exit(main())
