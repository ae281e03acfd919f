"""Run untrusted Python in an isolated, resource-limited process tree.

One run is three processes (plus whatever the program spawns):

  verifier (parent, this module's `run_python`)
   └─ launcher "A": trusted, `python -S sandbox.py --mopd-sandbox-launcher FD`
       └─ program "B": untrusted code, unprivileged

The parent builds the child environment from scratch (no inherited secrets),
starts A in a new session, and feeds it its job over stdin. When A runs as root it
isolates the tree before forking B:

  * network namespace with no interface up: no network at all, not even loopback,
    nor abstract unix sockets (their names are per network namespace);
  * IPC and PID namespaces: B is pid 1 of its own PID namespace, so the kernel kills
    every process left behind (setsid or not) the moment B exits, and B's /proc
    shows only its own processes. B is a tiny init ("init"): the program runs in its
    child, since pid 1 of a namespace ignores every signal it has no handler for, its
    own SIGTERM or alarm included; B reaps, and exits when the program does;
  * mount namespace with private propagation (nothing leaks to the host) in which
    home directories and the caller's cwd are hidden behind empty tmpfs (except the
    Python installation), /dev is a minimal tmpfs (null, zero, full, random,
    urandom: no GPUs, no disks), and every mount is bind-remounted read-only;
  * a new root ("newroot") that B chroots into: a small tmpfs holding read-only bind
    mounts of exactly the interpreter, its standard library, the shared libraries it
    and its extension modules load (/lib/<multiarch>, /usr/lib/<multiarch>, /lib64,
    the dirs of the libraries A has mapped, e.g. libpython), /etc/ld.so.cache,
    /etc/localtime, /usr/share/zoneinfo, and the allowlisted packages
    (`SandboxLimits.packages`, default `DEFAULT_PACKAGES`: numpy and sortedcontainers
    where installed; every other package dir in sight is an empty tmpfs); plus the
    minimal /dev, B's own /proc and fresh /tmp, /var/tmp, /dev/shm tmpfs with size and
    inode caps (cwd = /tmp/work). Nothing else of the host is there: not the
    repository, not datasets or benchmark packages (reference solutions), not host
    sockets under /run or /tmp (path-based unix sockets ignore read-only mounts and
    network namespaces). A chrooted process may not create user namespaces (a kernel
    rule, "no_user_namespaces"), so the program cannot mount a tmpfs of its own; with
    no capabilities it cannot leave the chroot either;
  * per-run cgroups, created by the parent before A starts and removed after the run:
    v1 `memory` (memory.limit_in_bytes, memsw where the kernel has it; kernel memory
    such as tmpfs inodes is charged too) and `pids`, nested in the parent's own; or
    one v2 cgroup (memory.max, memory.swap.max=0, memory.oom.group, pids.max) beside
    the parent's own (or under the root). B writes itself in first thing, so every
    page of the run counts against `SandboxLimits.run_memory_mb`: tmpfs, memfds,
    pipes, all processes. `SandboxResult.memory_peak_mb` / `oom_killed` report it.
    Where no cgroup is writable the run goes without (not listed in `isolation`);
  * B switches to a uid of its own (`UID_BASE + A's pid`, unique while the run
    lives), no supplementary groups, no capabilities, no_new_privs. So
    RLIMIT_NPROC is enforced and counts only this run's processes (fork bombs stop
    at `max_processes`), nothing outside its tmpfs is writable, and it can neither
    signal nor trace A, the verifier or anything else on the machine.

Always: rlimits (CPU, AS, FSIZE, NOFILE, NPROC, CORE=0), a wall-clock deadline,
stdout/stderr read incrementally with a size cap (the run is killed when exceeded),
the temp dir removed, and a final sweep that SIGKILLs every process carrying the
run's uid, its environment marker, its sessions, or A as an ancestor. A is a child
subreaper and reaps all it kills, and the parent kills the program's tree before A:
no zombie is ever handed to init (which, on some hosts, never reaps them).

Functional mode (`functional=` spec): B loads the program and then only *serves
calls* to its entry point over a socket; A runs the trusted tests (HumanEval
`check(candidate)`, assert statements, or argument lists) with a proxy candidate
whose return values are transferred as plain data (`encode_value`: builtin types
only, so no object with a custom `__eq__` ever reaches the tests). Test code and
expected values are sent to A only after B has been forked, and A reports results
to the parent on a pipe B does not hold; for argument lists A only relays the
results and the parent compares them with expected values that never enter the
sandbox. B cannot forge a pass: whatever it does, it only controls the values its
function returns.
Nor can it make the trusted side big: a message of B longer than `max_frame_bytes` is
refused from its length prefix, unread, and ends the run; A relays call results unparsed
(the parent parses them, one at a time), and the parent caps A's report lines and their
total (16 x `max_frame_bytes`). Values are rendered for feedback with `short_repr`.

Not protected against: kernel exploits; contention for CPU (no cpu cgroup); for
memory where the host offers no writable memory cgroup (then RLIMIT_AS is per
process, so one run may use up to `max_processes * memory_mb`, plus its tmpfs);
reading files where the new root could not be built (the masked host view above
then applies: world-readable files that are not hidden stay readable); timing side
channels. A program may not run other binaries than the interpreter (no /bin/sh).
The dataset's test code runs in A, as root inside the namespaces: it is trusted.
`disable_layers` can switch optional layers off (tests, or a host where one
misbehaves); the uid switch cannot be switched off. Without root none of the
namespaces or the uid switch are available: the run then only gets rlimits, a new
session, the sweep and a socket monkeypatch (bypassable), and a determined
program can tamper with the verifier process of the same uid. `SandboxResult.
isolation` lists the layers that were actually in force.

This file is also the launcher script, so it imports only the standard library.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import reprlib
import secrets
import select
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

UID_BASE = 0x20000000  # per-run uid = UID_BASE + launcher pid (pid_max <= 2**22)
MARKER_ENV = "MOPD_SANDBOX_MARKER"
OWNER_ENV = "MOPD_SANDBOX_OWNER"  # pid of the process that started the run (`end_runs_of`)
TMP_PREFIX = "mopd_sbx_"
_LAUNCH_FLAG = "--mopd-sandbox-launcher"
_LAUNCHER_PATH = os.path.abspath(__file__)
_MAX_FRAME = 64 << 20  # frames of trusted peers (the tests' arguments to B)
_MAX_VALUE_DEPTH = 200
# Installed packages a program may import (when installed; the standard library always).
DEFAULT_PACKAGES = ("numpy", "sortedcontainers")

# ---------------------------------------------------------------------------
# Public records.


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Resource limits of one run (per process where the kernel counts per process)."""

  wall_time_s: float = 5.0  # from the program's start, enforced by SIGKILL
  cpu_time_s: float | None = None  # RLIMIT_CPU; default: wall_time_s + 1
  memory_mb: int = 1024  # RLIMIT_AS per process
  max_processes: int = 16  # RLIMIT_NPROC (threads count too)
  max_output_bytes: int = 1 << 20  # per stream; exceeded -> killed, truncated
  # One message of the program to the launcher (functional mode: an encoded return value).
  # A longer one is refused from its length prefix, unread, and the run ends; the launcher's
  # reports (each relays at most one such message) may total 16 times this.
  max_frame_bytes: int = 4 << 20
  max_file_mb: int = 16  # RLIMIT_FSIZE
  max_open_files: int = 64  # RLIMIT_NOFILE
  tmp_mb: int = 64  # size of the private /tmp
  tmp_inodes: int = 8192  # files in the private /tmp (each costs kernel memory)
  setup_grace_s: float = 10.0  # interpreter start + isolation, before the program runs
  # All of the run's memory (every process, tmpfs, memfds, kernel memory): the memory
  # cgroup's limit. None: memory_mb + tmp_mb + 64 (the other tmpfs and kernel slack).
  total_memory_mb: int | None = None
  packages: tuple[str, ...] = DEFAULT_PACKAGES  # importable top-level packages besides stdlib

  @property
  def run_memory_mb(self) -> int:
    if self.total_memory_mb is not None:
      return int(self.total_memory_mb)
    return int(self.memory_mb) + int(self.tmp_mb) + 64


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What one run did. Program failures are data here; only `error` is ours."""

  exit_code: int | None  # program's status; -N: killed by signal N; None: unknown
  stdout: str
  stderr: str
  timed_out: bool
  output_truncated: bool
  wall_time_s: float
  reports: tuple[Mapping[str, Any], ...] = ()  # launcher events (functional results)
  isolation: tuple[str, ...] = ()  # layers in force, e.g. ("uid", "netns", ...)
  sandbox_uid: int | None = None
  marker: str = ""  # environment marker of this run (for leak checks)
  leftover_killed: int = 0  # processes the final sweep had to kill
  error: str = ""  # infrastructure failure (not the program's fault)
  memory_peak_mb: float | None = None  # the run's peak (memory cgroup), None without one
  oom_killed: bool = False  # the memory cgroup's limit killed a process of the run
  limit_exceeded: str = ""  # why the run was cut short for sending us too much (the program's fault)


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """Identity of one run, kept so tests and stress scripts can check for leaks."""

  seq: int
  uid: int | None
  marker: str
  workdir: str
  cgroups: tuple[str, ...] = ()


_RUN_LOG_LOCK = threading.Lock()
_RUN_LOG: list[RunRecord] = []
_RUN_SEQ = [0]


def run_count() -> int:
  with _RUN_LOG_LOCK:
    return _RUN_SEQ[0]


def recent_runs(since: int = 0) -> list[RunRecord]:
  """Runs numbered > `since` (the last 10000 at most)."""
  with _RUN_LOG_LOCK:
    return [r for r in _RUN_LOG if r.seq > since]


def _log_run(uid: int | None, marker: str, workdir: str, cgroups: Sequence[str] = ()) -> None:
  with _RUN_LOG_LOCK:
    _RUN_SEQ[0] += 1
    _RUN_LOG.append(RunRecord(_RUN_SEQ[0], uid, marker, workdir, tuple(cgroups)))
    del _RUN_LOG[:-10000]


def run_leftovers(run: RunRecord) -> list[str]:
  """What a finished run left behind (processes, zombies included; its temp dir, cgroups)."""
  found = [f"process {p.pid} (state {p.state}, uids {p.uids})"
           for p in find_processes(uid=run.uid, marker=run.marker)]
  if os.path.exists(run.workdir):
    found.append(f"temp dir {run.workdir}")
  found += [f"cgroup {c}" for c in run.cgroups if os.path.exists(c)]
  return found


# ---------------------------------------------------------------------------
# Feedback on values of any size.

_REPR_INT_BITS = 10_000  # ~3000 digits; Python refuses int->str past 4300 (a quadratic job)


class _ShortRepr(reprlib.Repr):
  def repr_int(self, x: int, level: int) -> str:
    if x.bit_length() <= _REPR_INT_BITS:
      return super().repr_int(x, level)
    sign, digits = "-" if x < 0 else "", int(x.bit_length() * 0.30103) + 1
    return f"<{sign}int of ~{digits} digits ...{abs(x) % 10 ** 6:06d}>"

  def repr_bytes(self, x: bytes, level: int) -> str:
    return repr(x) if len(x) <= self.maxstring else repr(x[:self.maxstring]) + "..."


def short_repr(x: Any, limit: int = 300) -> str:
  """repr(x) in at most `limit` (+3) chars, for feedback: built piecewise, so a huge value
  is never rendered whole, and never raising on huge ints (summarised instead)."""
  r = _ShortRepr()
  r.maxlevel = 8
  r.maxstring = r.maxlong = r.maxother = limit
  r.maxtuple = r.maxlist = r.maxarray = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = (
      max(4, limit // 4))
  text = r.repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------
# Plain-value transfer: builtin types only, so nothing user-defined crosses over.

_SEQ_TAGS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def _plainify(x: Any) -> Any:
  """Honest conveniences: numpy scalars/arrays become builtins (B side only)."""
  mod = type(x).__module__
  if mod == "numpy" and hasattr(x, "tolist"):
    return x.tolist()
  return x


def encode_value(x: Any, _depth: int = 0) -> Any:
  """JSON-able tagged form of a value built only from builtin types.

  Raises TypeError for anything else (including subclasses of builtins, whose
  `__eq__` could lie).
  """
  if _depth > _MAX_VALUE_DEPTH:
    raise ValueError("value nested too deeply")
  x = _plainify(x)
  t = type(x)
  if x is None or t is bool or t is str:
    return x
  if t is int:
    return {"int": hex(x)}  # hex: no int/str digit limit, exact
  if t is float:
    return {"float": x.hex()}
  if t is complex:
    return {"complex": [x.real.hex(), x.imag.hex()]}
  if t is bytes:
    return {"bytes": x.hex()}
  if t in (list, tuple, set, frozenset):
    items = [encode_value(v, _depth + 1) for v in x]
    if t in (set, frozenset):
      items.sort(key=lambda v: json.dumps(v, sort_keys=True))  # deterministic
    return {t.__name__: items}
  if t is dict:
    return {"dict": [[encode_value(k, _depth + 1), encode_value(v, _depth + 1)]
                     for k, v in x.items()]}
  raise TypeError(f"value of type {t.__qualname__} cannot be transferred "
                  "(only None, bool, int, float, complex, str, bytes, list, "
                  "tuple, set, frozenset, dict)")


def decode_value(v: Any, _depth: int = 0) -> Any:
  """Inverse of `encode_value`; strict, raises ValueError on anything unexpected."""
  if _depth > _MAX_VALUE_DEPTH:
    raise ValueError("value nested too deeply")
  t = type(v)
  if v is None or t is bool or t is str:
    return v
  if t is not dict or len(v) != 1:
    raise ValueError(f"malformed value {type(v).__name__}")
  (tag, payload), = v.items()
  try:
    if tag == "int" and type(payload) is str:
      return int(payload, 16)
    if tag == "float" and type(payload) is str:
      return float.fromhex(payload)
    if tag == "complex" and type(payload) is list and len(payload) == 2:
      return complex(float.fromhex(payload[0]), float.fromhex(payload[1]))
    if tag == "bytes" and type(payload) is str:
      return bytes.fromhex(payload)
    if tag in _SEQ_TAGS and type(payload) is list:
      return _SEQ_TAGS[tag](decode_value(i, _depth + 1) for i in payload)
    if tag == "dict" and type(payload) is list:
      out = {}
      for pair in payload:
        if type(pair) is not list or len(pair) != 2:
          raise ValueError("malformed dict item")
        out[decode_value(pair[0], _depth + 1)] = decode_value(pair[1], _depth + 1)
      return out
  except (TypeError, OverflowError) as e:
    raise ValueError(f"malformed {tag}: {e}") from None
  raise ValueError(f"unknown value tag {tag!r}")


# ---------------------------------------------------------------------------
# Processes of a run, found through /proc (no cgroups needed).


@dataclasses.dataclass(frozen=True)
class ProcInfo:
  pid: int
  state: str
  ppid: int
  sid: int
  uids: tuple[int, ...]


def _proc_info(pid: int) -> ProcInfo | None:
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read().decode("ascii", "replace")
    with open(f"/proc/{pid}/status", "rb") as f:
      status = f.read().decode("ascii", "replace")
  except OSError:
    return None
  rest = stat[stat.rfind(")") + 2:].split()
  uids: tuple[int, ...] = ()
  for line in status.splitlines():
    if line.startswith("Uid:"):
      uids = tuple(int(u) for u in line.split()[1:])
      break
  return ProcInfo(pid, rest[0], int(rest[1]), int(rest[3]), uids)


def _has_marker(pid: int, marker: bytes) -> bool:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      return marker in f.read()
  except OSError:
    return False


def find_processes(uid: int | None = None, marker: str = "", sessions: Sequence[int] = (),
                   ancestor: int | None = None) -> list[ProcInfo]:
  """Processes (zombies included) matching a run's uid, marker, session or ancestor."""
  me = {os.getpid(), os.getppid()}
  procs = [p for p in (_proc_info(int(n)) for n in os.listdir("/proc") if n.isdigit())
           if p is not None and p.pid not in me]
  children: dict[int, list[int]] = {}
  for p in procs:
    children.setdefault(p.ppid, []).append(p.pid)
  below: set[int] = set()
  stack = list(children.get(ancestor, [])) if ancestor else []
  while stack:
    pid = stack.pop()
    if pid not in below:
      below.add(pid)
      stack.extend(children.get(pid, []))
  marker_b = f"{MARKER_ENV}={marker}".encode() if marker else b""
  sess = set(sessions)
  return [p for p in procs
          if (uid is not None and uid in p.uids) or p.pid in below or p.sid in sess
          or (marker_b and _has_marker(p.pid, marker_b))]


def _kill_matching(exclude: int | None, **match: Any) -> int:
  """SIGKILL matching live processes until none are left; returns how many."""
  killed: set[int] = set()
  for attempt in range(200):
    live = [p.pid for p in find_processes(**match) if p.state != "Z" and p.pid != exclude]
    if not live:
      break
    for pid in live:
      try:
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
      except OSError:
        pass
    time.sleep(0.001 * min(attempt, 20))
  return len(killed)


# ---------------------------------------------------------------------------
# Per-run cgroups: every byte of a run counts against one limit, including memory that
# no process owns (tmpfs pages and inodes, memfds, pipes), which RLIMIT_AS misses.

_STALE_CGROUP_S = 600.0  # an empty run cgroup this old was left by a killed verifier


@dataclasses.dataclass(frozen=True)
class _Cgroup:
  path: str
  layers: tuple[str, ...]  # reported in SandboxResult.isolation, e.g. "memory_cgroup_v1"


def _cgroup_mounts() -> dict[str, str]:
  """Mount points: "memory"/"pids" -> their v1 hierarchy, "" -> the v2 hierarchy."""
  out: dict[str, str] = {}
  try:
    with open("/proc/self/mountinfo") as f:
      for line in f:
        pre, _, post = line.partition(" - ")
        fstype, _, opts = (post.split() + ["", "", ""])[:3]
        if fstype == "cgroup2":
          out.setdefault("", pre.split()[4])
        elif fstype == "cgroup":
          for c in set(opts.split(",")) & {"memory", "pids"}:
            out.setdefault(c, pre.split()[4])
  except OSError:
    pass
  return out


def _own_cgroups() -> dict[str, str]:
  """This process's cgroup per v1 controller, "" -> its v2 cgroup."""
  out: dict[str, str] = {}
  try:
    with open("/proc/self/cgroup") as f:
      for line in f:
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
          out[c] = path
  except (OSError, ValueError):
    pass
  return out


def _cg_write(path: str, value: Any) -> bool:
  try:
    with open(path, "w") as f:
      f.write(str(value))
    return True
  except OSError:
    return False


def _cg_mkdir(parent: str, name: str) -> str | None:
  """Creates `parent/name`, first removing the cgroups of runs whose verifier was killed
  (its pid, in the name, is gone; or the cgroup is old). rmdir fails on populated ones."""
  try:
    for entry in os.scandir(parent):
      if not (entry.name.startswith(TMP_PREFIX) and entry.is_dir()):
        continue
      owner = entry.name[len(TMP_PREFIX):].partition("_")[0]
      if ((owner.isdigit() and not os.path.exists(f"/proc/{owner}"))
          or time.time() - entry.stat().st_mtime > _STALE_CGROUP_S):
        try:
          os.rmdir(entry.path)
        except OSError:
          pass
    path = os.path.join(parent, name)
    os.mkdir(path)
    return path
  except OSError:
    return None


def _cgroups_v1(mounts: Mapping[str, str], own: Mapping[str, str], name: str,
                limits: SandboxLimits) -> list[_Cgroup]:
  """Nested in our own cgroups, so that whatever limits the host set on them still hold."""
  out = []
  mem = limits.run_memory_mb << 20
  wanted = {"memory": [("memory.limit_in_bytes", mem), ("memory.memsw.limit_in_bytes", mem)],
            "pids": [("pids.max", limits.max_processes + 1)]}  # + the init
  for ctrl, settings in wanted.items():
    if ctrl not in mounts:
      continue
    path = _cg_mkdir(mounts[ctrl] + own.get(ctrl, "/"), name)
    if path is None:
      continue
    key, value = settings[0]
    if not _cg_write(os.path.join(path, key), value):
      _cg_rmdir(path)
      continue
    for key, value in settings[1:]:  # swap accounting, where the kernel has it
      if os.path.exists(os.path.join(path, key)):
        _cg_write(os.path.join(path, key), value)
    out.append(_Cgroup(path, (f"{ctrl}_cgroup_v1",)))
  return out


def _cgroup_v2(root: str, own: str, name: str, limits: SandboxLimits) -> list[_Cgroup]:
  """A sibling of our own cgroup (a v2 cgroup that delegates memory has no processes of
  its own, so ours cannot be the parent), or a child of the root."""
  parents = [root + os.path.dirname(own)] if own not in ("", "/") else []
  for parent in parents + [root]:
    try:
      with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        enabled = f.read().split()
    except OSError:
      continue
    if "memory" not in enabled:
      _cg_write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
    if "pids" not in enabled:
      _cg_write(os.path.join(parent, "cgroup.subtree_control"), "+pids")
    path = _cg_mkdir(parent, name)
    if path is None:
      continue
    if not _cg_write(os.path.join(path, "memory.max"), limits.run_memory_mb << 20):
      _cg_rmdir(path)
      continue
    _cg_write(os.path.join(path, "memory.swap.max"), 0)
    _cg_write(os.path.join(path, "memory.oom.group"), 1)  # an OOM kill ends the whole run
    layers = ["memory_cgroup_v2"]
    if _cg_write(os.path.join(path, "pids.max"), limits.max_processes + 1):
      layers.append("pids_cgroup_v2")
    return [_Cgroup(path, tuple(layers))]
  return []


def _make_cgroups(name: str, limits: SandboxLimits) -> list[_Cgroup]:
  """The run's cgroups (v1 memory and pids, or one v2 cgroup); [] where the host offers none
  we can write (then the run goes without, and `isolation` says so)."""
  mounts, own = _cgroup_mounts(), _own_cgroups()
  if "memory" in mounts:
    return _cgroups_v1(mounts, own, name, limits)
  if "" in mounts:
    return _cgroup_v2(mounts[""], own.get("", "/"), name, limits)
  return []


def _cg_rmdir(path: str) -> bool:
  """Removes a run cgroup, killing what is still in it (nothing, normally)."""
  for attempt in range(200):
    try:
      os.rmdir(path)
      return True
    except FileNotFoundError:
      return True
    except OSError:  # still populated: processes exiting or not yet reaped
      _cg_write(os.path.join(path, "cgroup.kill"), 1)  # v2, Linux >= 5.14
      try:
        with open(os.path.join(path, "cgroup.procs")) as f:
          pids = [int(p) for p in f.read().split()]
      except (OSError, ValueError):
        pids = []
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
      time.sleep(0.001 * min(attempt + 1, 20))
  return False


def remove_cgroups_of(owner: int) -> int:
  """Removes the cgroups of the runs process `owner` started, killing what is left in them:
  the cgroup part of `end_runs_of`, for a caller that killed `owner` mid-run (runs of ours
  also sweep them, lazily: see `_cg_mkdir`). Returns how many it removed."""
  mounts, own = _cgroup_mounts(), _own_cgroups()
  parents = [mounts[c] + own.get(c, "/") for c in ("memory", "pids") if c in mounts]
  if "" in mounts:
    parents += [mounts[""] + os.path.dirname(own.get("", "/")), mounts[""]]
  removed = 0
  for parent in dict.fromkeys(parents):
    try:
      names = os.listdir(parent)
    except OSError:
      continue
    for name in names:
      if name.startswith(f"{TMP_PREFIX}{owner}_"):
        removed += _cg_rmdir(os.path.join(parent, name))
  return removed


def _cgroup_report(cgroups: Sequence[_Cgroup]) -> dict[str, Any]:
  """The run's memory peak and whether its limit killed something."""
  def read(path: str) -> str:
    try:
      with open(path) as f:
        return f.read()
    except OSError:
      return ""

  for cg in cgroups:
    if "memory_cgroup_v1" in cg.layers:
      peak = read(f"{cg.path}/memory.max_usage_in_bytes")
      events = read(f"{cg.path}/memory.oom_control")
    elif "memory_cgroup_v2" in cg.layers:
      peak = read(f"{cg.path}/memory.peak")  # Linux >= 5.19
      events = read(f"{cg.path}/memory.events")
    else:
      continue
    kills = re.search(r"^oom_kill (\d+)", events, re.M)
    return {"memory_peak_mb": int(peak) / (1 << 20) if peak.strip().isdigit() else None,
            "oom_killed": bool(kills and int(kills.group(1)))}
  return {}


def package_paths(names: Sequence[str]) -> tuple[list[str], list[str]]:
  """(files and dirs of the installed top-level packages `names`, with the shared libraries
  their wheels vendor in `<name>.libs`; the sys.path entries they are found in)."""
  import importlib.util
  paths, dirs = [], []
  for name in names:
    try:
      spec = importlib.util.find_spec(name)  # found, not imported
    except (ImportError, ValueError):
      spec = None
    if spec is None:
      continue
    locs = list(spec.submodule_search_locations or [])
    if not locs and spec.origin and os.path.isabs(spec.origin):
      locs = [spec.origin]  # a single-module package
    for loc in locs:
      base = os.path.dirname(os.path.abspath(loc))
      paths.append(os.path.abspath(loc))
      dirs.append(base)
      if os.path.isdir(os.path.join(base, f"{name}.libs")):
        paths.append(os.path.join(base, f"{name}.libs"))
  return list(dict.fromkeys(paths)), list(dict.fromkeys(dirs))


def _site_dirs() -> list[str]:
  """Where installed packages live: hidden in the program's root but for the allowlist."""
  import site
  dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
  dirs += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  return list(dict.fromkeys(os.path.realpath(d) for d in dirs if d))


# ---------------------------------------------------------------------------
# Parent side.


def _frame(obj: Any) -> bytes:
  data = json.dumps(obj, separators=(",", ":")).encode()
  return struct.pack("!I", len(data)) + data


def _child_env(workdir: str, marker: str) -> dict[str, str]:
  """Built from scratch: nothing of the caller's environment reaches the program."""
  return {
      "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
      "HOME": workdir, "TMPDIR": workdir,
      "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
      "PYTHONHASHSEED": "0",  # deterministic set/dict-of-str ordering -> deterministic verdicts
      "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
      "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
      MARKER_ENV: marker, OWNER_ENV: str(os.getpid()),
  }


def default_hide_paths() -> tuple[str, ...]:
  """Hidden from the program (empty tmpfs) when isolation is available."""
  return tuple(dict.fromkeys(["/root", "/home", os.path.expanduser("~"), os.getcwd()]))


OPTIONAL_LAYERS = frozenset(["mountns", "netns", "ipcns", "pidns", "hide", "mindev", "readonly",
                             "newroot", "cgroup", "init"])


def run_python(source: str, *, stdin: str | bytes = b"", functional: Mapping[str, Any] | None = None,
               limits: SandboxLimits = SandboxLimits(),
               hide_paths: Sequence[str] | None = None,
               disable_layers: Sequence[str] = ()) -> SandboxResult:
  """Runs `source` as `__main__` (or, with `functional`, serves its entry point).

  `functional` = {"kind": "check"|"asserts"|"call", "entry_point": str, ...}; see
  `_drive_functional`. `disable_layers` (subset of OPTIONAL_LAYERS) switches layers
  off, to test the fallbacks or where one misbehaves; the uid switch cannot be.
  Never raises for anything the program does.
  """
  if not set(disable_layers) <= OPTIONAL_LAYERS:
    raise ValueError(f"can only disable {sorted(OPTIONAL_LAYERS)}, got {list(disable_layers)}")
  if isinstance(stdin, str):
    stdin = stdin.encode()
  marker = secrets.token_hex(16)
  workdir = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}_")  # owner: see end_runs_of
  # Created before the launcher starts, removed after everything in it is gone.
  cg_name = f"{TMP_PREFIX}{os.getpid()}_{marker[:16]}"  # owner's pid: see _cg_mkdir
  cgroups = [] if "cgroup" in disable_layers else _make_cgroups(cg_name, limits)
  report_r, report_w = os.pipe()
  t0 = time.monotonic()
  proc = None
  uid = None
  finished = False
  try:
    packages, package_dirs = package_paths(limits.packages)
    cfg = {
        "mode": "functional" if functional is not None else "program",
        "source": source, "stdin": stdin.hex(),
        "entry_point": (functional or {}).get("entry_point", ""),
        "limits": dataclasses.asdict(limits),
        "hide": list(default_hide_paths() if hide_paths is None else hide_paths),
        "disable": list(disable_layers),
        "cgroups": [[c.path, list(c.layers)] for c in cgroups],
        "packages": packages, "package_dirs": package_dirs, "site_dirs": _site_dirs(),
    }
    payload = _frame(cfg)
    if functional is not None:
      payload += _frame(dict(functional))  # A reads this only after forking B
    try:
      proc = subprocess.Popen(
          [sys.executable, "-S", "-P", _LAUNCHER_PATH, _LAUNCH_FLAG, str(report_w)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          pass_fds=(report_w,), cwd=workdir, env=_child_env(workdir, marker),
          start_new_session=True, close_fds=True)
    except OSError as e:
      return SandboxResult(None, "", "", False, False, time.monotonic() - t0, marker=marker,
                           error=f"could not start sandbox: {e}")
    finally:
      os.close(report_w)
    uid = UID_BASE + proc.pid if os.geteuid() == 0 else None
    _log_run(uid, marker, workdir, [c.path for c in cgroups])
    res = _supervise(proc, report_r, payload, limits, uid, marker, t0)
    finished = True
    joined = [c for c in cgroups if set(c.layers) <= set(res.isolation)]
    return dataclasses.replace(res, **_cgroup_report(joined))
  finally:
    if proc is not None and not finished:  # interrupted, e.g. by a pool ending this worker
      _end_launcher(proc, uid, marker)
    os.close(report_r)
    for cg in cgroups:
      _cg_rmdir(cg.path)
    shutil.rmtree(workdir, ignore_errors=True)


def _end_launcher(proc: subprocess.Popen, uid: int | None, marker: str) -> None:
  """Ends a run cut short: the program's tree first (A, a subreaper, reaps it; killed first,
  A would hand it to init), then A's group, then a last sweep. A waited for: no zombie."""
  match = dict(uid=uid, marker=marker, sessions=(proc.pid,))
  _kill_matching(proc.pid, ancestor=proc.pid, **match)
  try:
    proc.wait(timeout=1.0)
  except subprocess.TimeoutExpired:
    pass
  _kill_group(proc)
  _kill_matching(None, **match)


def _environ(pid: int) -> bytes:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      return f.read()
  except OSError:
    return b""


def _env_value(environ: bytes, name: str) -> str | None:
  for item in environ.split(b"\0"):
    key, eq, value = item.partition(b"=")
    if eq and key == name.encode():
      return value.decode("utf-8", "replace")
  return None


def end_runs_of(owner: int) -> int:
  """Ends the runs process `owner` started and, once `owner` is dead, removes their temp dirs
  and cgroups: the cleanup of `run_python` for a caller that has killed `owner` mid-run (or
  stopped it: then it starts no new run). Each launcher dies after its program's tree, as in
  `_end_launcher`; one whose parent is gone leaves its zombie to init. Returns how many
  processes it killed."""
  procs = [p for p in (_proc_info(int(n)) for n in os.listdir("/proc") if n.isdigit())
           if p is not None and p.state != "Z"]
  runs = {p.pid: env for p in procs
          if _env_value(env := _environ(p.pid), OWNER_ENV) == str(owner)}
  killed = 0
  for p in procs:  # a run's launcher: the top of its tagged processes
    if p.pid in runs and p.ppid not in runs:
      match = dict(uid=UID_BASE + p.pid if p.uids[:1] == (0,) else None, sessions=(p.pid,),
                   marker=_env_value(runs[p.pid], MARKER_ENV) or "")
      killed += _kill_matching(p.pid, ancestor=p.pid, **match)
      killed += _kill_matching(None, **match)
  if (info := _proc_info(owner)) is None or info.state == "Z":  # its runs' files are unused
    root = tempfile.gettempdir()
    for name in os.listdir(root):
      if name.startswith(f"{TMP_PREFIX}{owner}_"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    remove_cgroups_of(owner)
  return killed


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except OSError:
    pass
  proc.wait()


@dataclasses.dataclass
class _Stream:
  fd: int
  cap: int  # bytes kept in all; past it `overflow`
  data: bytearray = dataclasses.field(default_factory=bytearray)
  overflow: bool = False
  received: int = 0


def _supervise(proc: subprocess.Popen, report_r: int, payload: bytes, limits: SandboxLimits,
               uid: int | None, marker: str, t0: float) -> SandboxResult:
  out = _Stream(proc.stdout.fileno(), limits.max_output_bytes)
  err = _Stream(proc.stderr.fileno(), limits.max_output_bytes)
  rep = _Stream(report_r, 16 * limits.max_frame_bytes)
  streams = {s.fd: s for s in (out, err, rep)}
  sel = selectors.DefaultSelector()
  for fd in streams:
    os.set_blocking(fd, False)
    sel.register(fd, selectors.EVENT_READ)
  stdin_fd = proc.stdin.fileno()
  os.set_blocking(stdin_fd, False)
  sel.register(stdin_fd, selectors.EVENT_WRITE)
  pending = memoryview(payload)
  events = _Events(deadline=t0 + limits.wall_time_s + limits.setup_grace_s,
                   wall_time_s=limits.wall_time_s,
                   max_line=2 * limits.max_frame_bytes + (64 << 10))  # a relayed frame: 4/3
  open_fds = set(streams)
  timed_out = truncated = False
  exited_at = None  # launcher exited: short grace for the pipes' EOF

  while open_fds:
    now = time.monotonic()
    if events.finished_at is None and now >= events.deadline:
      timed_out = True
      break
    if exited_at is None and proc.poll() is not None:
      exited_at = now
    if exited_at is not None and now >= exited_at + 0.5:
      break
    if events.finished_at is not None and now >= events.finished_at + 5.0:
      break  # launcher is cleaning up for too long: the sweep below finishes it
    wait = 0.1 if events.finished_at is not None else min(0.1, events.deadline - now)
    for key, _ in sel.select(timeout=max(0.0, wait)):
      if key.fd == stdin_fd:
        try:
          pending = pending[os.write(stdin_fd, pending):]
        except BlockingIOError:
          continue
        except OSError:  # launcher gone; its report (or its absence) says why
          pending = pending[:0]
        if not pending:
          sel.unregister(stdin_fd)
          proc.stdin.close()
      elif not _read_into(streams[key.fd], sel, open_fds):
        continue
      elif key.fd == report_r:
        events.parse(rep.data)
    if out.overflow or err.overflow:
      truncated = True
      break
    if rep.overflow:
      events.limit_exceeded = (f"the program's replies exceed {rep.cap} bytes in all "
                               "(16 x max_frame_bytes)")
    if events.limit_exceeded:
      break

  # Kill what is left: the program's tree first (A stays alive to reap it and to
  # report), then A's whole group, then a last sweep.
  sessions = tuple(p for p in (proc.pid, events.program_pid) if p)
  killed = _kill_matching(proc.pid, uid=uid, marker=marker, sessions=sessions,
                          ancestor=proc.pid)
  try:
    proc.wait(timeout=1.0)
  except subprocess.TimeoutExpired:
    pass
  _kill_group(proc)
  killed += _kill_matching(None, uid=uid, marker=marker, sessions=sessions)
  end = time.monotonic() + 0.5
  while open_fds and time.monotonic() < end:  # what is still buffered in the pipes
    for key, _ in sel.select(timeout=0.05):
      if key.fd in open_fds:
        _read_into(streams[key.fd], sel, open_fds)
  events.parse(rep.data)
  sel.close()
  for f in (proc.stdin, proc.stdout, proc.stderr):
    try:
      f.close()
    except OSError:
      pass
  # The launcher enforces its own, later deadline and says when it hit it. Counting that too
  # keeps the verdict's details the same when this process was starved past its deadline
  # and read the launcher's "done" before noticing (seen once in 18,500 stress runs at load 8).
  timed_out = timed_out or any(ev.get("timed_out") is True for ev in events.reports)
  error = events.error
  if not events.reports and not timed_out and not truncated and not error:
    error = f"launcher exited with status {proc.returncode} before reporting"
  return SandboxResult(
      exit_code=events.exit_code,
      stdout=out.data.decode("utf-8", "replace"),
      stderr=err.data.decode("utf-8", "replace"),
      timed_out=timed_out, output_truncated=truncated or out.overflow or err.overflow,
      wall_time_s=time.monotonic() - t0, reports=tuple(events.reports),
      isolation=events.isolation, sandbox_uid=uid, marker=marker, leftover_killed=killed,
      error=error, limit_exceeded=events.limit_exceeded)


def _read_into(s: _Stream, sel: selectors.BaseSelector, open_fds: set[int]) -> bool:
  """One non-blocking read into a capped buffer; False when nothing was read."""
  try:
    chunk = os.read(s.fd, 1 << 16)
  except BlockingIOError:
    return False
  if not chunk:
    sel.unregister(s.fd)
    open_fds.discard(s.fd)
    return False
  room = max(0, s.cap - s.received)
  s.data += chunk[:room]
  s.received += len(chunk)
  s.overflow |= len(chunk) > room
  return True


@dataclasses.dataclass
class _Events:
  """The launcher's report stream, parsed as it arrives."""

  deadline: float
  wall_time_s: float
  max_line: int = _MAX_FRAME
  reports: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)
  finished_at: float | None = None
  program_pid: int | None = None
  exit_code: int | None = None
  isolation: tuple[str, ...] = ()
  error: str = ""
  limit_exceeded: str = ""

  def parse(self, data: bytearray) -> None:
    """Takes the complete lines off the front of `data` (only a partial line stays)."""
    end = data.rfind(b"\n") + 1
    lines = data[:end]
    del data[:end]
    if len(data) > self.max_line:
      self.limit_exceeded = f"a launcher report exceeds {self.max_line} bytes"
    for line in lines.split(b"\n"):
      try:
        ev = json.loads(line) if line else None
      except (ValueError, RecursionError):
        continue
      if not isinstance(ev, dict):
        continue
      self.reports.append(ev)
      kind = ev.get("ev")
      if kind == "started":  # the program's clock starts now
        self.deadline = time.monotonic() + self.wall_time_s
        self.program_pid = ev.get("pid")
        self.isolation = tuple(ev.get("layers", ()))
      elif kind in ("exit", "done", "error"):
        self.finished_at = time.monotonic()
        if kind == "exit":
          self.exit_code = ev.get("code")
        if kind == "error":
          self.error = str(ev.get("error", ""))


def relayed_reply(ev: Mapping[str, Any]) -> dict[str, Any]:
  """The program's reply to one call of a "call" run, from the launcher's test event:
  {"ok": value}, {"raised": exception name, "msg": str}, {"gone": True, "error": why (may be
  "")}, or {"invalid": why} for anything else. Parsed here, not in the launcher (see
  `_drive_functional`); everything in it is the program's."""
  if "frame" not in ev:
    reply = ev.get("reply")
    return {"gone": True, "error": str(reply.get("error", "")) if isinstance(reply, dict) else ""}
  try:
    reply = json.loads(base64.b64decode(ev["frame"], validate=True))
  except (ValueError, TypeError, RecursionError) as e:
    return {"invalid": f"malformed reply: {type(e).__name__}"}
  if not isinstance(reply, dict):
    return {"invalid": "malformed reply"}
  if "ok" in reply:
    try:
      return {"ok": decode_value(reply["ok"])}
    except (ValueError, RecursionError) as e:
      return {"invalid": _safe_str(e, 300)}
  return {"raised": str(reply.get("raised", "Exception"))[:100],
          "msg": str(reply.get("msg", ""))[:1000]}


# ---------------------------------------------------------------------------
# Launcher side (runs as `python -S sandbox.py --mopd-sandbox-launcher FD`).

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
# Only ever remount with MS_BIND: a plain MS_REMOUNT would change the (shared)
# superblock, i.e. make the host's filesystem read-only.
_RO_BIND_REMOUNT = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
_KEEP_MOUNT_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                     "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_PROTECTED_DIRS = frozenset(["/", "/tmp", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                             "/libx32", "/etc", "/dev", "/proc", "/sys", "/var", "/run",
                             "/opt", "/boot", "/srv", "/mnt", "/media"])


class _Libc:
  """The few syscalls the standard library lacks in 3.11."""

  def __init__(self):
    import ctypes
    self._ct = ctypes
    self._c = ctypes.CDLL(None, use_errno=True)
    self._c.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    self._c.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    self._c.unshare.argtypes = [ctypes.c_int]

  def _check(self, rc: int, what: str) -> None:
    if rc != 0:
      err = self._ct.get_errno()
      raise OSError(err, f"{what}: {os.strerror(err)}")

  def unshare(self, flags: int) -> None:
    self._check(self._c.unshare(flags), "unshare")

  def mount(self, src: str | None, target: str, fstype: str | None, flags: int,
            data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    self._check(self._c.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
                f"mount {target}")

  def umount(self, target: str) -> None:
    self._check(self._c.umount2(target.encode(), MNT_DETACH), f"umount {target}")

  def prctl(self, option: int, arg: int) -> None:
    c = self._ct.c_ulong
    self._check(self._c.prctl(self._ct.c_int(option), c(arg), c(0), c(0), c(0)), "prctl")


class _Conn:
  """Length-prefixed JSON frames over a socket. A frame longer than `max_bytes` is refused
  from its length prefix, before any of it is read (the peer may be the program), and ends
  the connection; `error` then says why."""

  def __init__(self, sock, max_bytes: int = _MAX_FRAME):
    self.sock = sock
    self.max_bytes = max_bytes
    self.error = ""

  def send(self, obj: Any) -> None:
    self.sock.sendall(_frame(obj))

  def recv(self, timeout: float | None = None) -> Any:
    """The next frame, or None on EOF, timeout, a refused frame or garbage."""
    data = self.recv_raw(timeout)
    if data is None:
      return None
    try:
      return json.loads(data)
    except (ValueError, RecursionError):
      self.error = "malformed reply"
      return None

  def recv_raw(self, timeout: float | None = None) -> bytearray | None:
    """The next frame's bytes, unparsed; None as for `recv`."""
    if self.error:  # what follows a refused frame is no frame
      return None
    try:
      self.sock.settimeout(timeout)
      header = self._exact(4)
      if header is None:
        return None
      (n,) = struct.unpack("!I", header)
      if n > self.max_bytes:
        self.error = (f"reply frame of {n} bytes exceeds the limit of {self.max_bytes} bytes "
                      "(max_frame_bytes)")
        return None
      return self._exact(n)
    except OSError:
      return None

  def _exact(self, n: int) -> bytearray | None:
    return _read_exact(lambda view: self.sock.recv_into(view, min(len(view), 1 << 20)), n)


def _read_exact(read_into: Any, n: int) -> bytearray | None:
  """n bytes in one buffer of exactly that size (no regrowth, no copies); None at EOF."""
  buf = bytearray(n)
  view = memoryview(buf)
  got = 0
  while got < n:
    k = read_into(view[got:])
    if not k:
      return None
    got += k
  return buf


def _read_frame(fd: int) -> Any:
  """Reads exactly one frame (never more: the next one is not ours yet). Only the parent
  writes to this pipe (trusted, so not capped)."""
  def exact(n: int) -> bytearray:
    data = _read_exact(lambda view: os.readv(fd, [view]), n)
    if data is None:
      raise EOFError("config pipe closed")
    return data
  (n,) = struct.unpack("!I", exact(4))
  return json.loads(exact(n))


class _Reporter:
  def __init__(self, fd: int):
    self.fd = fd

  def send(self, **event: Any) -> None:
    data = memoryview(json.dumps(event, separators=(",", ":")).encode() + b"\n")
    try:
      while data:
        data = data[os.write(self.fd, data):]
    except OSError:
      pass


def _within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip("/") + "/")


def _minimal_dirs(paths: Sequence[str]) -> list[str]:
  out: list[str] = []
  for p in sorted(set(paths), key=len):
    if not any(_within(p, q) for q in out):
      out.append(p)
  return out


def _python_paths() -> list[str]:
  """What the interpreter needs to keep working after the filesystem is masked."""
  cands = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
           os.path.dirname(sys.executable), *sys.path]
  out = []
  for p in cands:
    if not p:
      continue
    rp = os.path.realpath(p)
    if os.path.isfile(rp):
      rp = os.path.dirname(rp)
    if os.path.isdir(rp):
      out.append(rp)
  return sorted(set(out))


def _mountinfo() -> list[tuple[str, str]]:
  unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
  out = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      out.append((unescape(fields[4]), fields[5]))
  return out


def _mask_dirs(libc: _Libc, hides: Sequence[str], needed: Sequence[str], stage: str) -> list[str]:
  """Puts an empty tmpfs over each hidden dir, re-exposing the `needed` dirs inside it.

  A hidden dir may lie inside a needed one (e.g. a dataset's folder in site-packages);
  one that *is* needed is left alone.
  """
  masked = []
  # Outer dirs first: a nested hide may sit in a tree re-exposed by an outer one.
  for h in sorted({os.path.realpath(h) for h in hides if h}, key=len):
    inner = _minimal_dirs([k for k in needed if _within(k, h)])
    if (h in _PROTECTED_DIRS or h in inner or not os.path.isdir(h) or _within(h, "/tmp")
        or _within(stage, h)):
      continue
    staged = []
    for k in inner:  # bind the needed trees aside before covering them
      s = os.path.join(stage, str(len(os.listdir(stage))))
      os.mkdir(s, 0o700)
      libc.mount(k, s, None, MS_BIND | MS_REC)
      staged.append((k, s))
    libc.mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    for k, s in staged:
      os.makedirs(k, mode=0o755, exist_ok=True)
      libc.mount(s, k, None, MS_BIND | MS_REC)
    masked.append(h)
  return masked


def _minimal_dev(libc: _Libc) -> bool:
  import stat
  libc.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
  try:
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
      os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(1, minor))
      os.chmod(f"/dev/{name}", 0o666)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
      os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    os.mkdir("/dev/shm")
    return True
  except OSError:
    libc.umount("/dev")  # keep the real /dev (still read-only below)
    return False


def _remount_readonly(libc: _Libc) -> bool:
  root_done = False
  for mountpoint, opts in _mountinfo():
    opt_set = set(opts.split(","))
    if "ro" in opt_set:
      continue
    flags = _RO_BIND_REMOUNT
    for name, bit in _KEEP_MOUNT_FLAGS.items():
      if name in opt_set:
        flags |= bit
    assert flags & MS_BIND  # see _RO_BIND_REMOUNT
    try:
      libc.mount(None, mountpoint, None, flags)
      root_done |= mountpoint == "/"
    except OSError:
      pass  # e.g. over-mounted by a mask; what is visible was handled
  return root_done


def _isolate(cfg: Mapping[str, Any], uid: int, libc: _Libc) -> tuple[list[str], str, str]:
  """Namespaces and filesystem for the run (A is root). Returns (layers, B's workdir, the
  root B chroots into, "" for none)."""
  layers = ["uid"]
  workdir = os.getcwd()
  off = set(cfg.get("disable", ()))
  wanted = [(name, flag) for name, flag in (
      ("mountns", CLONE_NEWNS), ("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC),
      ("pidns", CLONE_NEWPID)) if name not in off]
  try:
    libc.unshare(sum(flag for _, flag in wanted))
    layers += [name for name, _ in wanted]
  except OSError:
    for name, flag in wanted:
      try:
        libc.unshare(flag)
        layers.append(name)
      except OSError:
        pass
  if "mountns" in layers:
    try:
      libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing may propagate to the host
    except OSError:
      layers.remove("mountns")
  if "mountns" not in layers:
    os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    return layers, workdir, ""
  limits = cfg["limits"]
  stage = os.path.join(workdir, "stage")
  os.mkdir(stage, 0o700)
  root = os.path.join(workdir, "root")
  os.mkdir(root, 0o755)  # now: the host's /tmp is read-only below
  if "hide" not in off and _mask_dirs(libc, cfg["hide"], _python_paths(), stage):
    layers.append("hide")
  if "mindev" not in off and _minimal_dev(libc):
    layers.append("mindev")
  if "readonly" not in off and _remount_readonly(libc):
    layers.append("readonly")
  workdir = "/tmp/work"
  if "newroot" not in off:
    try:
      _build_root(libc, root, cfg, uid, "pidns" in layers)
      # B chroots into it: a chrooted process may not create user namespaces (the
      # kernel's rule), so no tmpfs of its own; without capabilities it cannot leave.
      return layers + ["privtmp", "newroot", "no_user_namespaces"], workdir, root
    except OSError as e:
      _warn(f"no new root ({e}); the program sees the host's file system, masked")
  libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, _tmpfs_opts(limits, "/tmp"))
  for d in ("/var/tmp", "/dev/shm"):
    if os.path.isdir(d):
      libc.mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, _tmpfs_opts(limits, d))
  os.mkdir(workdir, 0o700)
  os.chown(workdir, uid, uid)
  layers.append("privtmp")
  return layers, workdir, ""


def _warn(msg: str) -> None:
  try:
    os.write(2, f"sandbox: {msg}\n".encode())
  except OSError:
    pass


def _tmpfs_opts(limits: Mapping[str, Any], path: str) -> str:
  """The program's writable tmpfs: size and inode caps (an inode costs ~1 KB of kernel memory)."""
  if path == "/tmp":
    return f"mode=1777,size={int(limits['tmp_mb'])}m,nr_inodes={int(limits['tmp_inodes'])}"
  return "mode=1777,size=16m,nr_inodes=1024"


def _mirror(root: str, path: str, depth: int = 0) -> str:
  """Resolves `path` like the kernel does, recreating under `root` every symlink met on
  the way; returns the resolved path."""
  if depth > 16:
    raise OSError(f"too many levels of symbolic links: {path}")
  cur = "/"
  for part in path.split("/"):
    if part in ("", "."):
      continue
    if part == "..":
      cur = os.path.dirname(cur)
      continue
    nxt = os.path.join(cur, part)
    if not os.path.islink(nxt):
      cur = nxt
      continue
    target = os.readlink(nxt)
    if not os.path.lexists(root + nxt):
      os.makedirs(os.path.dirname(root + nxt), 0o755, exist_ok=True)
      os.symlink(target, root + nxt)
    cur = _mirror(root, os.path.join(cur, target), depth + 1)
  return cur


def _bind(libc: _Libc, root: str, path: str, flags: int = MS_NODEV) -> bool:
  """Makes host `path` visible, read-only, at the same place under `root`."""
  real = _mirror(root, path)
  if not os.path.exists(real):
    return False
  dst = root + real
  if os.path.lexists(dst):  # inside something already exposed
    return True
  if os.path.isdir(real):
    os.makedirs(dst, 0o755)
  else:
    os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
    os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
  libc.mount(real, dst, None, MS_BIND | MS_REC)
  libc.mount(None, dst, None, _RO_BIND_REMOUNT | flags)
  return True


def _runtime_paths() -> list[str]:
  """What the interpreter needs: itself, its standard library, the shared libraries it
  and its extension modules load, the dynamic loader's cache, time zones."""
  import sysconfig
  dirs = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
  dirs += [p for p in sys.path if os.path.basename(p) == "lib-dynload"]
  arch = sysconfig.get_config_var("MULTIARCH")
  dirs += [f"/lib/{arch}", f"/usr/lib/{arch}"] if arch else []
  dirs += ["/lib64", "/usr/lib64", "/usr/share/zoneinfo"]
  with open("/proc/self/maps") as f:  # libpython, a conda env's lib, ...
    for line in f:
      name = line.split(None, 5)[5:]
      if name and name[0].startswith("/") and ".so" in name[0]:
        dirs.append(os.path.dirname(name[0].strip()))
  files = [sys.executable, os.path.join(sys.prefix, "pyvenv.cfg"),  # a venv's, if any
           "/etc/ld.so.cache", "/etc/localtime"]
  return list(dict.fromkeys(files + dirs))


def _mask_sites(libc: _Libc, root: str, exposed: Sequence[str], sites: Sequence[str]) -> list[str]:
  """An empty tmpfs over every package dir visible in `root` (e.g. site-packages inside the
  standard library's dir, or a system python's dist-packages in /usr/lib)."""
  import glob
  cands = set(sites)
  for d in _minimal_dirs([d for d in exposed if os.path.isdir(d)]):
    for pattern in ("*-packages", "python*/*-packages"):
      cands.update(os.path.realpath(p) for p in glob.glob(os.path.join(d, pattern)))
  masks = []
  for d in sorted(cands, key=len):
    if os.path.isdir(root + d) and not any(_within(d, m) for m in masks):
      libc.mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV,
                 "mode=755,size=64k,nr_inodes=256")
      masks.append(d)
  return masks


def _build_root(libc: _Libc, root: str, cfg: Mapping[str, Any], uid: int, own_proc: bool) -> None:
  """The program's whole file system, at `root`: the interpreter and its standard library,
  the allowlisted packages, minimal /dev and /proc, private tmpfs; all else of the host
  (repository, other packages, datasets, host sockets under /run or /tmp) is absent."""
  libc.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m,nr_inodes=4096")
  # Outer paths first: an inner one then lies inside an exposed tree (nothing to do).
  paths = sorted(_runtime_paths(), key=lambda p: len(os.path.realpath(p)))
  exposed = [p for p in paths if _bind(libc, root, p)]
  masks = _mask_sites(libc, root, [os.path.realpath(p) for p in exposed], cfg.get("site_dirs", ()))
  for p in cfg.get("packages", ()):
    _bind(libc, root, p)
  _bind(libc, root, "/dev", MS_NOEXEC)  # A's minimal one (mindev), else the host's, read-only
  if own_proc:
    os.mkdir(root + "/proc", 0o555)  # B mounts its PID namespace's proc here
  else:
    _bind(libc, root, "/proc")
  for d in ("/tmp", "/var/tmp", "/dev/shm"):
    os.makedirs(root + d, 0o755, exist_ok=True)
    libc.mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, _tmpfs_opts(cfg["limits"], d))
  os.mkdir(root + "/tmp/work", 0o700)
  os.chown(root + "/tmp/work", uid, uid)
  for m in masks + ["/"]:  # the skeleton and masks: nothing writable but the tmpfs above
    libc.mount(None, os.path.normpath(root + m), None, _RO_BIND_REMOUNT | MS_NODEV)


def _set_rlimits(limits: Mapping[str, Any], nproc: int) -> None:
  import resource
  cpu = limits["cpu_time_s"]
  cpu = int(limits["wall_time_s"]) + 1 if cpu is None else int(max(1, cpu))
  wanted = {
      resource.RLIMIT_CPU: (cpu, cpu + 1),  # soft: SIGXCPU, hard: SIGKILL
      resource.RLIMIT_AS: (int(limits["memory_mb"]) << 20,) * 2,
      resource.RLIMIT_FSIZE: (int(limits["max_file_mb"]) << 20,) * 2,
      resource.RLIMIT_NOFILE: (int(limits["max_open_files"]),) * 2,
      resource.RLIMIT_NPROC: (nproc,) * 2,
      resource.RLIMIT_CORE: (0, 0),
  }
  for res, (soft, hard) in wanted.items():
    _, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:  # no CAP_SYS_RESOURCE needed: only lower
      soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(res, (soft, hard))


_LAUNCHER_MODULES = ("atexit", "builtins", "linecache", "socket", "traceback", "types")
_COMMON_MODULES = (
    "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
    "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math", "operator",
    "queue", "random", "re", "statistics", "string", "struct", "textwrap", "threading", "time",
    "typing", "unittest", "cmath", "numbers", "contextlib", "traceback", "pprint")


def _world_readable(path: str) -> bool:
  """Whether any uid can traverse every directory down to `path`."""
  import stat
  p = os.path.realpath(path)
  while True:
    try:
      if not os.stat(p).st_mode & stat.S_IXOTH:
        return False
    except OSError:
      return False
    if p == "/":
      return True
    p = os.path.dirname(p)


def _preimport(names: Sequence[str]) -> None:
  import importlib
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError:
      pass


def _count_own_processes() -> int:
  uid = os.getuid()
  return sum(1 for n in os.listdir("/proc") if n.isdigit() and
             (info := _proc_info(int(n))) is not None and info.uids[:1] == (uid,))


def _weak_preamble() -> None:
  """Without root there are no namespaces: at least keep honest code off the network."""
  import socket

  def refuse(*args: Any, **kwargs: Any) -> Any:
    raise PermissionError("network access is disabled in the sandbox")

  class _NoSocket(socket.socket):
    def __init__(self, family: int = -1, *args: Any, **kwargs: Any):
      if family in (socket.AF_INET, socket.AF_INET6, -1):
        refuse()
      super().__init__(family, *args, **kwargs)

  socket.socket = _NoSocket  # type: ignore[misc]
  socket.create_connection = refuse  # type: ignore[assignment]
  socket.getaddrinfo = refuse  # type: ignore[assignment]


def _child_main(cfg: Mapping[str, Any], uid: int | None, layers: Sequence[str], workdir: str,
                sock: Any, libc: _Libc | None, root: str = "", cg_fds: Sequence[int] = (),
                status_fd: int | None = None) -> None:
  """Program process B. Trusted until the user's code starts."""
  limits = cfg["limits"]
  for fd in cg_fds:  # first: from here on, everything the run allocates counts
    os.write(fd, b"0")
    os.close(fd)
  os.setsid()
  if libc is not None and "pidns" in layers and "mountns" in layers:
    try:  # B is pid 1 of the new pid namespace: give it a /proc of its own
      libc.unshare(CLONE_NEWNS)
      libc.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
      pass
  if root:
    os.chroot(root)
    os.chdir("/")  # at once: a cwd outside the root would be a way out
  sys.path.extend(d for d in cfg.get("package_dirs", ()) if d not in sys.path)
  if cfg["mode"] == "program":
    fd = os.memfd_create("stdin", 0)
    data = bytes.fromhex(cfg["stdin"])
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
  else:
    fd = os.open(os.devnull, os.O_RDONLY)
  os.dup2(fd, 0)
  os.close(fd)
  keep = 2
  if sock is not None:  # the call channel becomes fd 3; nothing else survives
    os.dup2(sock.fileno(), 3)
    sock.close()
    import socket
    sock = socket.socket(fileno=3)
    keep = 3
  if status_fd is not None:  # the init's report of the program's status to A
    os.dup2(status_fd, keep + 1)
    status_fd = keep = keep + 1
  os.closerange(keep + 1, 1 << 16)
  os.chdir(workdir)
  nproc = int(limits["max_processes"]) + ("init" in layers)
  if uid is None:  # shared uid: RLIMIT_NPROC counts all of the user's processes
    nproc += _count_own_processes()
  _preimport(_LAUNCHER_MODULES)  # what the rest of B's own code needs
  if uid is not None and "mountns" not in layers and not _world_readable(sys.prefix):
    _preimport(_COMMON_MODULES)  # the new uid may not reach the interpreter's files
  _set_rlimits(limits, nproc)
  if uid is not None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  if libc is not None:
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot give privileges back
    libc.prctl(PR_SET_DUMPABLE, 1)  # own /proc/self readable again (uid change reset it)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # A gone -> B gone
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  if "init" in layers:
    _become_init(libc, status_fd)  # returns in the program's process
  elif status_fd is not None:
    os.close(status_fd)
  os.environ["HOME"] = workdir
  os.environ["TMPDIR"] = "/tmp" if "privtmp" in layers else workdir
  if "netns" not in layers:
    _weak_preamble()
  if cfg["mode"] == "program":
    _run_program(cfg["source"])
  else:
    _serve_calls(cfg["source"], cfg["entry_point"], _Conn(sock))


def _become_init(libc: _Libc | None, status_fd: int | None) -> None:
  """B is pid 1 of its PID namespace, which the kernel shields from every signal it has no
  handler for, its own included. So the program runs in a child (and dies of its own
  SIGTERM, alarm, ... as in plain Python), and B only reaps orphans until the program
  exits, passes on its wait status to A and exits (the kernel then kills what is left)."""
  pid = os.fork()
  if pid == 0:
    if status_fd is not None:
      os.close(status_fd)
    if libc is not None:
      libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return
  if libc is not None:
    libc.prctl(PR_SET_DUMPABLE, 0)  # the program may not trace or read its init
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # a handler would let the program's SIGINT in
  keep = -1 if status_fd is None else status_fd
  os.closerange(0, max(keep, 0))  # only the program holds its pipes and call socket
  os.closerange(keep + 1, 1 << 16)
  while True:
    try:
      done, status = os.waitpid(-1, 0)
    except ChildProcessError:
      os._exit(0)
    if done == pid:
      if status_fd is not None:
        os.write(status_fd, struct.pack("!i", status))
      os._exit(0)


def _new_main(source: str) -> dict[str, Any]:
  """A fresh `__main__` namespace for the program (tracebacks show its lines)."""
  import builtins
  import linecache
  import types
  mod = types.ModuleType("__main__")
  mod.__file__ = "solution.py"
  mod.__builtins__ = builtins
  sys.modules["__main__"] = mod
  sys.argv = ["solution.py"]
  linecache.cache["solution.py"] = (len(source), None, source.splitlines(True), "solution.py")
  return mod.__dict__


def _exec_source(source: str, ns: dict[str, Any]) -> None:
  # dont_inherit: the launcher's `from __future__` flags must not leak into user code.
  exec(compile(source, "solution.py", "exec", dont_inherit=True), ns)


def _user_traceback(e: BaseException) -> str:
  """The traceback without the launcher's own frames."""
  import traceback
  tb = e.__traceback__
  while tb is not None and tb.tb_frame.f_code.co_filename == _LAUNCHER_PATH:
    tb = tb.tb_next
  return "".join(traceback.format_exception(type(e), e, tb))


def _exit_status(e: SystemExit) -> int:
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code & 0xFF
  try:
    print(e.code, file=sys.stderr)
  except Exception:  # noqa: BLE001
    pass
  return 1


def _run_program(source: str) -> None:
  import traceback  # now: after a MemoryError there may be no room to import it
  status = 0
  ns = _new_main(source)
  try:
    _exec_source(source, ns)
  except SystemExit as e:
    status = _exit_status(e)
  except BaseException as e:  # noqa: BLE001
    status = 1
    for _ in range(2):
      try:
        sys.stderr.write(_user_traceback(e))
        break
      except MemoryError:  # free what the program holds, then retry
        traceback.clear_frames(e.__traceback__)
        ns.clear()
      except BaseException:  # noqa: BLE001
        break
  try:  # what a normal interpreter exit would do
    import atexit
    main = threading.main_thread()
    for t in threading.enumerate():
      if t is not main and not t.daemon:
        t.join()
    atexit._run_exitfuncs()
  except BaseException:  # noqa: BLE001
    pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # noqa: BLE001
      pass
  os._exit(status)


def _safe_str(e: BaseException, limit: int = 1000) -> str:
  try:
    return str(e)[:limit]
  except BaseException:  # noqa: BLE001
    return "<unprintable>"


def _resolve_entry(ns: Mapping[str, Any], entry_point: str) -> Any:
  """`name`, or `Class.method` (LeetCode style: called on a fresh instance)."""
  head, _, method = entry_point.partition(".")
  if head not in ns:
    raise NameError(f"entry point {head!r} is not defined")
  obj = ns[head]
  if method:
    obj = getattr(obj(), method)
  if not callable(obj):
    raise TypeError(f"entry point {entry_point!r} is not callable")
  return obj


def _serve_calls(source: str, entry_point: str, conn: _Conn) -> None:
  """B's side of functional mode: load the program, then answer calls."""
  try:
    ns = _new_main(source)
    _exec_source(source, ns)
    fn = _resolve_entry(ns, entry_point)
  except BaseException as e:  # noqa: BLE001  (SystemExit included: exiting is a failure)
    try:
      conn.send({"load_error": _user_traceback(e)[-2000:]})
    except BaseException:  # noqa: BLE001
      pass
    os._exit(1)
  conn.send({"ready": True})
  while True:
    req = conn.recv()
    if req is None:
      os._exit(0)
    try:
      result = fn(*decode_value(req["args"]), **decode_value(req["kwargs"]))
      reply = {"ok": encode_value(result)}
    except BaseException as e:  # noqa: BLE001
      reply = {"raised": type(e).__name__[:100], "msg": _safe_str(e)}
    try:
      sys.stdout.flush()
    except BaseException:  # noqa: BLE001
      pass
    conn.send(reply)


class CandidateAborted(BaseException):
  """The program died, hung or exited mid-call. A BaseException, so that tests with
  `except Exception` cannot swallow it."""


def _describe(e: BaseException, tb: Any, last: Mapping[str, Any]) -> str:
  import traceback
  msg = type(e).__name__ + (f": {_safe_str(e, 300)}" if _safe_str(e) else "")
  frames = [f for f in traceback.extract_tb(tb) if f.filename.startswith("<test")]
  if frames and frames[-1].line:
    msg += f"\n  at: {frames[-1].line.strip()[:300]}"
  if "call" in last:
    msg += f"\n  last call: {last['call'][:300]}"
    if "result" in last:
      msg += f" -> {last['result'][:300]}"
  return msg


def _make_candidate(conn: _Conn, name: str, deadline: float, last: dict[str, Any]) -> Any:
  import builtins

  def candidate(*args: Any, **kwargs: Any) -> Any:
    if last.get("gone"):
      raise CandidateAborted("the program is no longer running")
    req = {"args": encode_value(args), "kwargs": encode_value(kwargs)}
    shown = ", ".join([short_repr(a) for a in args] +
                      [f"{k}={short_repr(v)}" for k, v in kwargs.items()])
    last.clear()
    last["call"] = f"{name}({shown})"
    try:
      conn.send(req)
    except OSError:
      last["gone"] = True
      raise CandidateAborted("the program exited before answering") from None
    reply = conn.recv(timeout=max(0.0, deadline - time.monotonic()))
    if not isinstance(reply, dict):
      last["gone"] = True
      raise CandidateAborted(conn.error or "the program exited, crashed or timed out during the call")
    if "ok" in reply:
      value = decode_value(reply["ok"])
      last["result"] = short_repr(value)  # repr() may be huge, or refuse a huge int
      return value
    exc_name, msg = str(reply.get("raised", "Exception")), str(reply.get("msg", ""))
    cls = getattr(builtins, exc_name, None)
    last["result"] = f"raised {exc_name}: {msg[:200]}"
    if isinstance(cls, type) and issubclass(cls, Exception):
      raise cls(msg)  # lets tests that expect e.g. ValueError work
    raise CandidateAborted(f"{exc_name}: {msg}")  # SystemExit & co: a failure, always

  candidate.__name__ = candidate.__qualname__ = name
  return candidate


def _drive_functional(spec: Mapping[str, Any], conn: _Conn, report: _Reporter,
                      deadline: float) -> None:
  """A's side: run the trusted tests against the program's entry point."""
  import builtins
  import linecache
  first = conn.recv(timeout=max(0.0, deadline - time.monotonic()))
  if not isinstance(first, dict) or not first.get("ready"):
    err = first.get("load_error") if isinstance(first, dict) else conn.error
    report.send(ev="load_error", error=str(err or "the program exited or timed out while loading")[-2000:],
                timed_out=time.monotonic() >= deadline)
    return
  kind = spec["kind"]
  if kind == "call":
    for i, call in enumerate(spec["calls"]):
      try:
        conn.send({"args": call[0], "kwargs": call[1] if len(call) > 1 else {"dict": []}})
      except OSError:
        report.send(ev="test", i=i, reply={"gone": True})
        return
      frame = conn.recv_raw(timeout=max(0.0, deadline - time.monotonic()))
      if frame is None:
        report.send(ev="test", i=i, reply={"gone": True, "error": conn.error},
                    timed_out=time.monotonic() >= deadline)
        return
      # Relayed unparsed, for the parent to judge (`relayed_reply`): parsing it here as well
      # would only multiply the program's bytes in this process. Base64: the report line is
      # 4/3 of the frame, whatever bytes it holds.
      report.send(ev="test", i=i, frame=base64.b64encode(frame).decode("ascii"))
    return
  # "check" (HumanEval) and "asserts" (MBPP): trusted code runs here, in A.
  entry = spec["entry_point"]
  last: dict[str, Any] = {}
  candidate = _make_candidate(conn, entry, deadline, last)
  g: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}

  def compile_test(src: str, name: str) -> Any:
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    return compile(src, name, "exec", dont_inherit=True)

  if spec.get("prompt_code"):  # helpers the tests may use (e.g. HumanEval's encode_cyclic)
    try:
      exec(compile_test(spec["prompt_code"], "<test prompt>"), g)
    except Exception:  # noqa: BLE001  a bare stub may not run on its own; fine
      pass
  if "." not in entry:
    g[entry] = candidate
  g["candidate"] = candidate
  if spec.get("test_code"):
    try:
      exec(compile_test(spec["test_code"], "<test code>"), g)
    except BaseException as e:  # noqa: BLE001
      report.send(ev="test_code_error", error=_describe(e, e.__traceback__, {}))
      return
  tests = list(spec.get("asserts") or [])
  for i, src in enumerate(tests or [None]):
    last.clear()
    try:
      if src is None:
        g["check"](candidate)
      else:
        exec(compile_test(src, f"<test {i}>"), g)
      ok, err = not last.get("gone"), ""
      if not ok:
        err = "the program died during the test"
    except BaseException as e:  # noqa: BLE001
      ok, err = False, _describe(e, e.__traceback__, last)
    report.send(ev="test", i=i, ok=ok, error=err, timed_out=bool(last.get("gone")) and time.monotonic() >= deadline)


def _wait_program(pid: int, deadline: float) -> tuple[int | None, bool]:
  """(exit status or -signal, timed out) of B, killing it at the deadline."""
  pidfd = os.pidfd_open(pid)
  poller = select.poll()
  poller.register(pidfd, select.POLLIN)
  timed_out = not poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
  if timed_out:
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  try:
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
  except ChildProcessError:
    return None, timed_out
  finally:
    os.close(pidfd)
  if info is None:
    return None, timed_out
  code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
  return code, timed_out


def _program_status(status_r: int, init_code: int | None) -> int | None:
  """The program's exit status as its init passed it on; the init's own when there is none
  (the init was killed: deadline, memory limit)."""
  os.set_blocking(status_r, False)
  try:
    data = os.read(status_r, 4)
  except OSError:
    data = b""
  finally:
    os.close(status_r)
  if len(data) != 4:
    return init_code
  return os.waitstatus_to_exitcode(struct.unpack("!i", data)[0])


def _open_cgroups(cfg: Mapping[str, Any]) -> tuple[list[int], list[str]]:
  """Write ends of the run's cgroup.procs files (B writes itself in) and their layers."""
  fds, layers = [], []
  for path, names in cfg.get("cgroups", ()):
    try:
      fds.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
      layers += names
    except OSError:
      pass
  return fds, layers


def _reap_all(program_pid: int, uid: int | None) -> None:
  """Kills B and its leftovers (orphans come back to A, a subreaper) and reaps them."""
  try:
    os.kill(program_pid, signal.SIGKILL)
  except OSError:
    pass
  end = time.monotonic() + 2.0
  while True:
    _kill_matching(None, uid=uid, ancestor=os.getpid())
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      if time.monotonic() > end:
        return
      time.sleep(0.002)


def _launcher_main(report_fd: int) -> None:
  report = _Reporter(report_fd)
  try:
    cfg = _read_frame(0)
    _launch(cfg, report, report_fd)
  except BaseException as e:  # noqa: BLE001  tell the parent; never hang
    report.send(ev="error", error=f"{type(e).__name__}: {e}")
    os._exit(70)
  os._exit(0)


def _launch(cfg: Mapping[str, Any], report: _Reporter, report_fd: int) -> None:
  import site
  sys.path.extend(p for p in site.getsitepackages() if os.path.isdir(p) and p not in sys.path)
  limits = cfg["limits"]
  functional = cfg["mode"] == "functional"
  try:
    libc: _Libc | None = _Libc()
  except (OSError, AttributeError):
    libc = None
  uid = None
  layers: list[str] = []
  workdir = os.getcwd()
  root = ""
  cg_fds, cg_layers = _open_cgroups(cfg)  # now: /sys/fs/cgroup is read-only after _isolate
  if os.geteuid() == 0:  # never run the program as root, even without ctypes
    uid = UID_BASE + os.getpid()
    if libc is not None:
      layers, workdir, root = _isolate(cfg, uid, libc)
    else:
      layers = ["uid"]
      os.chown(workdir, uid, uid)
  layers += cg_layers  # B joins them first thing, or fails
  if "pidns" in layers and "init" not in cfg.get("disable", ()):
    layers.append("init")
  status_r = status_w = None
  if "init" in layers and not functional:
    status_r, status_w = os.pipe()
  if libc is not None:
    libc.prctl(PR_SET_DUMPABLE, 0)  # same-uid programs cannot ptrace or read A
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come back to A, not init
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the caller killed -> the run ends now
    if str(os.getppid()) != os.environ.get(OWNER_ENV):  # it died before that
      os._exit(72)
  if functional:  # B's status is not needed: let the kernel reap it at once
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
  sock_a = sock_b = None
  if functional:
    import socket
    sock_a, sock_b = socket.socketpair()
  pid = os.fork()
  if pid == 0:
    try:
      os.close(report_fd)
      if sock_a is not None:
        sock_a.close()
      if status_r is not None:
        os.close(status_r)
      _child_main(cfg, uid, layers, workdir, sock_b, libc, root, cg_fds, status_w)
    except BaseException as e:  # noqa: BLE001  fail closed, and say why
      try:
        os.write(2, f"sandbox: program process failed: {type(e).__name__}: {e}\n".encode())
      except BaseException:  # noqa: BLE001
        pass
    finally:
      os._exit(71)
  for fd in cg_fds + ([status_w] if status_w is not None else []):
    os.close(fd)
  deadline = time.monotonic() + float(limits["wall_time_s"]) + 0.5
  report.send(ev="started", pid=pid, uid=uid, layers=layers)
  if functional:
    sock_b.close()
    spec = _read_frame(0)  # tests arrive only now: B's memory never held them
    _drive_functional(spec, _Conn(sock_a, int(limits["max_frame_bytes"])), report, deadline)
    report.send(ev="done")
  else:
    code, timed_out = _wait_program(pid, deadline)
    if status_r is not None:
      code = _program_status(status_r, code)
    report.send(ev="exit", code=code, timed_out=timed_out)
  _reap_all(pid, uid)


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == _LAUNCH_FLAG:
  _launcher_main(int(sys.argv[2]))
