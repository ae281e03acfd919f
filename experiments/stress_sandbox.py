"""Stress test of the code sandbox: runs the adversarial suite N times.

Each iteration runs every case of `tests/test_code_sandbox.py` (CASES) through the
code verifier and records wrong verdicts, side effects (leftover processes with the
run's uid or environment marker, zombies included; leftover temp dirs and cgroups;
touched canaries; created files; connections to our TCP and unix sockets), and verdicts
that differ from the case's first run (determinism). Ends with a sweep for any process in
the sandbox uid range. The attacks of the outside review are cases too (no_unix_sockets,
userns_tmpfs_blocked, memfd_bomb, ...); `experiments/attack_sandbox.py` replays them alone.

  python experiments/stress_sandbox.py --n 500
  python experiments/stress_sandbox.py --n 20 --cases infinite_loop,fork_bomb_os_fork

Needs root (the adversarial cases assume the full sandbox). Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib.util
import os
import sys
import time

from mopd_jax.verifiers import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_suite():
  path = os.path.join(ROOT, "tests", "test_code_sandbox.py")
  spec = importlib.util.spec_from_file_location("test_code_sandbox", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve annotations through it
  spec.loader.exec_module(module)
  return module


@dataclasses.dataclass
class CaseStats:
  runs: int = 0
  failures: int = 0
  nondeterministic: int = 0
  seconds: float = 0.0
  first_problems: list[str] = dataclasses.field(default_factory=list)


def _uid_range_processes() -> list[sandbox.ProcInfo]:
  """Any process, of any run, in the sandbox uid range."""
  lo, hi = sandbox.UID_BASE, sandbox.UID_BASE + (1 << 22)
  procs = (sandbox._proc_info(int(n)) for n in os.listdir("/proc") if n.isdigit())
  return [p for p in procs if p is not None and any(lo <= u < hi for u in p.uids)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=500, help="iterations of the whole suite")
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  args = parser.parse_args()
  if os.geteuid() != 0:
    print("needs root: the adversarial cases assume the full sandbox", file=sys.stderr)
    return 2
  suite = load_suite()
  wanted = {c for c in args.cases.split(",") if c}
  cases = [c for c in suite.CASES if not wanted or c.name in wanted]
  if wanted - {c.name for c in cases}:
    print(f"unknown cases: {sorted(wanted - {c.name for c in cases})}", file=sys.stderr)
    return 2
  tmp_before = set(glob.glob(os.path.join("/tmp", sandbox.TMP_PREFIX + "*")))
  since = sandbox.run_count()
  stats = collections.OrderedDict((c.name, CaseStats()) for c in cases)
  signatures: dict[str, tuple] = {}
  t_start = time.monotonic()
  for it in range(args.n):
    t_it = time.monotonic()
    for case in cases:
      st = stats[case.name]
      t0 = time.monotonic()
      verdict, problems = suite.run_case(case)
      st.seconds += time.monotonic() - t0
      st.runs += 1
      sig = suite.verdict_signature(verdict)
      if signatures.setdefault(case.name, sig) != sig:
        st.nondeterministic += 1
        problems = problems + [f"verdict changed: {sig} vs first {signatures[case.name]}"]
      if problems:
        st.failures += 1
        if len(st.first_problems) < 3:
          st.first_problems.append(f"iter {it}: {problems}")
        # At once, with the load: a verdict that flips under load must be diagnosable.
        print(f"  problem in {case.name} (iteration {it + 1}, {time.monotonic() - t0:.1f} s, load "
              f"{os.getloadavg()[0]:.1f}): {problems}", flush=True)
    bad = sum(s.failures for s in stats.values())
    print(f"iteration {it + 1}/{args.n}: {time.monotonic() - t_it:.1f} s, "
          f"cases with problems so far: {bad}", flush=True)

  runs = sandbox.recent_runs(since)
  leftover = [x for r in runs for x in sandbox.run_leftovers(r)]
  in_range = _uid_range_processes()
  new_tmp = sorted(set(glob.glob(os.path.join("/tmp", sandbox.TMP_PREFIX + "*"))) - tmp_before)
  total = time.monotonic() - t_start

  print(f"\n{'case':40s} {'runs':>5s} {'fail':>5s} {'nondet':>6s} {'mean s':>7s}")
  for name, st in stats.items():
    print(f"{name:40s} {st.runs:5d} {st.failures:5d} {st.nondeterministic:6d} "
          f"{st.seconds / max(st.runs, 1):7.2f}")
  for name, st in stats.items():
    for line in st.first_problems:
      print(f"  {name}: {line}")
  n_cases = sum(s.runs for s in stats.values())
  n_fail = sum(s.failures for s in stats.values())
  n_nondet = sum(s.nondeterministic for s in stats.values())
  print(f"\niterations: {args.n}  case runs: {n_cases}  sandbox runs: {len(runs)}  "
        f"time: {total:.0f} s")
  print(f"case runs with problems: {n_fail}  nondeterministic verdicts: {n_nondet}")
  print(f"leftover processes/temp dirs of these runs (end of run): {len(leftover)}")
  print(f"processes in the sandbox uid range now (any run): {len(in_range)}")
  print(f"new {sandbox.TMP_PREFIX}* dirs in /tmp: {len(new_tmp)}")
  for x in (leftover + [str(p) for p in in_range] + new_tmp)[:20]:
    print(f"  {x}")
  return int(bool(n_fail or leftover or in_range or new_tmp))


if __name__ == "__main__":
  sys.exit(main())
