"""Where device time went in a `jax.profiler` trace: the ops that took longest, summed by name.

    python experiments/profile_summary.py TRACE_DIR_OR_XPLANE [--top 25] [--steps 1]

Reads the `.xplane.pb` files that `jax.profiler.start_trace(dir)` writes (under
dir/plugins/profile/<run>/). On a GPU the device planes are `/device:GPU:N`; their lines hold
the kernels (and memcpys) as they ran on the streams. On CPU (no device plane) the XLA ops of
the host threads are summarised instead, which is rougher. Times are summed over all events of
one name; `--steps` divides them to give a per-step figure.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os


def trace_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  return sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))


def device_op_times(path: str) -> tuple[str, dict[str, float], float]:
  """(plane name, {op name: total ns}, busy span ns) for the first GPU plane, else the host."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  host = not planes
  if host:
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  totals: dict[str, float] = collections.defaultdict(float)
  start, end = float("inf"), 0.0
  for plane in planes[:1]:
    lines = list(plane.lines)
    if not host:
      # GPU: the stream lines ("Stream #N(...)") hold kernels; the derived summary lines
      # ("XLA Modules", "XLA Ops", "Steps") would count them twice. Without stream lines
      # (another profiler version), fall back to "XLA Ops".
      print(f"# {plane.name} lines: {[line.name for line in lines]}")
      streams = [line for line in lines if line.name.startswith("Stream")]
      lines = streams or [line for line in lines if line.name == "XLA Ops"]
    for line in lines:
      for event in line.events:
        totals[event.name] += event.duration_ns
        start, end = min(start, event.start_ns), max(end, event.end_ns)
  name = planes[0].name if planes else "(no plane)"
  return name, dict(totals), (end - start) if end > start else 0.0


def print_top_ops(path: str, *, top: int = 25, steps: int = 1) -> None:
  plane, totals, span = device_op_times(path)
  busy = sum(totals.values())
  print(f"# profile {os.path.basename(path)}: plane {plane}, {len(totals)} distinct ops, "
        f"busy {busy / 1e6 / steps:.2f} ms per step, first-to-last span {span / 1e6 / steps:.2f} ms per step")
  for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    share = 100 * ns / busy if busy else 0.0
    print(f"#   {ns / 1e6 / steps:9.3f} ms {share:5.1f}%  {name[:110]}")


def profile_call(trace_dir: str, fn, *, steps: int = 1):
  """Run fn() under `jax.profiler`, print its top device ops (per step), return its result."""
  import jax

  jax.profiler.start_trace(trace_dir)
  out = jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  for path in trace_files(trace_dir):
    print_top_ops(path, steps=steps)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--steps", type=int, default=1)
  args = p.parse_args(argv)
  files = trace_files(args.path)
  if not files:
    raise SystemExit(f"no .xplane.pb under {args.path}")
  for f in files:
    print_top_ops(f, top=args.top, steps=args.steps)


if __name__ == "__main__":
  main()
