"""The verifier protocol, the verifier registry, and parallel batch verification.

A verifier judges one completion of one `Example` and returns a `Verdict`. Verifiers are
registered by name; `Example.verifier` names the one that understands its `reference`.

`verify_batch` runs verifications in worker processes with a per-item deadline. It never
raises into the caller: an unknown verifier, an exception, a crashed worker or a timeout all
become a failure verdict (reward 0) whose feedback names what went wrong. A worker that runs
past its deadline is killed and replaced, so the items after it still run. Killing a worker
ends what it started too: SIGTERM first, on which the verification unwinds and cleans up (a
sandbox run kills its process tree and removes its temp dir), then SIGKILL and a sweep
(`sandbox.end_runs_of`) for a worker that did not finish in time or died on its own.

Workers are started with the 'forkserver' method (never 'fork': the trainer process holds
JAX's threads) and run each verification in their main thread, so verifiers may use
signal-based timeouts (math-verify does).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Protocol, Sequence, runtime_checkable

from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import sandbox

DEFAULT_DEADLINE_S = 30.0

# Verifiers shipped with the library: imported on first use, so `get_verifier("code")` works
# without the caller importing the module (and so workers can resolve them too).
BUILTIN_VERIFIER_MODULES: dict[str, str] = {
    "math": "mopd_jax.verifiers.math",
    "multiple_choice": "mopd_jax.verifiers.multiple_choice",
    "tool_call": "mopd_jax.verifiers.tool_call",
    "code": "mopd_jax.verifiers.code",
    "reasoning_gym": "mopd_jax.tasks.reasoning_gym",
}

# Imported once by the forkserver, so each new worker starts with them already loaded
# (math-verify pulls in sympy: ~0.5 s per fresh interpreter otherwise).
FORKSERVER_PRELOAD: tuple[str, ...] = ("mopd_jax.verifiers.base", "mopd_jax.verifiers.math")

# Under `python -m pkg.mod` the forkserver preloads `pkg.mod` by name (see `mp_context`), and each
# worker then re-runs it as `__mp_main__`, on which runpy warns "'pkg.mod' found in sys.modules
# after import of package 'pkg'" once per worker. Harmless; workers inherit this filter from the
# forkserver, which imports this module.
warnings.filterwarnings("ignore", message=r"'[\w.]+' found in sys\.modules after import of package",
                        category=RuntimeWarning)


@runtime_checkable
class Verifier(Protocol):
  """Judges one completion of one example. Should not raise; `verify_batch` guards anyway."""

  name: str

  def __call__(self, example: Example, completion: str) -> Verdict:
    ...


# ------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Verifier] = {}
_REGISTRY_LOCK = threading.Lock()


def register_verifier(verifier: Verifier, *, name: str | None = None,
                      overwrite: bool = False) -> Verifier:
  """Registers `verifier` under `name` (default: `verifier.name`); returns it.

  Re-registering an instance of the same class is allowed (a module imported twice);
  replacing a different verifier needs `overwrite=True`.
  """
  key = name or getattr(verifier, "name", None)
  if not key or not isinstance(key, str):
    raise ValueError(f"verifier {verifier!r} has no usable name")
  if not callable(verifier):
    raise TypeError(f"verifier {key!r} is not callable")
  with _REGISTRY_LOCK:
    old = _REGISTRY.get(key)
    if old is not None and not overwrite and type(old) is not type(verifier):
      raise ValueError(f"verifier {key!r} is already registered ({old!r}); "
                       "pass overwrite=True to replace it")
    _REGISTRY[key] = verifier
  return verifier


# Built-in modules that define a verifier class without registering an instance.
_BUILTIN_VERIFIER_CLASSES: dict[str, str] = {"code": "CodeVerifier"}


def get_verifier(name: str) -> Verifier:
  """The verifier registered as `name`, importing a built-in one on first use."""
  verifier = _REGISTRY.get(name)
  if verifier is None and name in BUILTIN_VERIFIER_MODULES:
    module = importlib.import_module(BUILTIN_VERIFIER_MODULES[name])
    verifier = _REGISTRY.get(name)
    cls = getattr(module, _BUILTIN_VERIFIER_CLASSES.get(name, ""), None)
    if verifier is None and cls is not None:
      verifier = register_verifier(cls(), name=name)
  if verifier is None:
    known = sorted(set(_REGISTRY) | set(BUILTIN_VERIFIER_MODULES))
    raise KeyError(f"unknown verifier {name!r}; known verifiers: {known}. "
                   "Register custom ones with register_verifier().")
  return verifier


def registered_verifiers() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _verifier_module(name: str) -> str | None:
  """The module a worker must import to find verifier `name` (None: nothing importable)."""
  if name in BUILTIN_VERIFIER_MODULES:
    return BUILTIN_VERIFIER_MODULES[name]
  verifier = _REGISTRY.get(name)
  if verifier is None:
    return None
  module = getattr(verifier, "__module__", None) or type(verifier).__module__
  return None if module in ("__main__", "__mp_main__") else module


# ---------------------------------------------------------------------------- feedback

FEEDBACK_CHARS = 1000  # feedback quotes untrusted text (answers, values): keep it this short


def clip(text: str, n: int = FEEDBACK_CHARS) -> str:
  """`text` cut to `n` chars, saying how many were left out."""
  return text if len(text) <= n else f"{text[:n]}... [{len(text) - n} more chars]"


# ------------------------------------------------------------------ one verification


def verify_one(example: Example, completion: str) -> Verdict:
  """Runs the example's verifier in this thread, turning any error into a failure verdict."""
  try:
    if not isinstance(completion, str):
      return failure_verdict(f"completion must be a str, got {type(completion).__name__}")
    verifier = get_verifier(example.verifier)
    verdict = verifier(example, completion)
    if not isinstance(verdict, Verdict):
      return failure_verdict(f"verifier {example.verifier!r} returned "
                             f"{type(verdict).__name__}, not a Verdict")
    return verdict
  except (Exception, SystemExit) as e:  # SystemExit too: a verifier must not end the worker.
    return failure_verdict(f"verifier {example.verifier!r} raised {type(e).__name__}: {e}",
                           error=type(e).__name__)


def apply_success_threshold(verdict: Verdict, threshold: float) -> Verdict:
  """`verdict` with success = reward >= threshold: graded rewards in [0, 1] (the code verifier's
  fraction of unit tests passed, reasoning-gym's partial scores) then count as successes from
  `threshold` on. threshold >= 1 keeps the verifier's own success, which every built-in verifier
  sets exactly when the reward is 1 (the authors' equivalent: `success_reward_threshold`)."""
  if threshold >= 1.0:
    return verdict
  return dataclasses.replace(verdict, success=verdict.reward >= threshold)


# ------------------------------------------------------------------------ worker pool


def mp_context() -> multiprocessing.context.BaseContext:
  """The 'forkserver' context, preloading `FORKSERVER_PRELOAD` (if not started yet).

  The main module is preloaded too (as multiprocessing does by default): otherwise every
  new worker would re-import it (e.g. a trainer script importing JAX) before its first item.
  """
  ctx = multiprocessing.get_context("forkserver")
  preload = ["__main__"]
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if main_spec is not None and main_spec.name:  # Run with `python -m`: preload by name.
    preload.append(main_spec.name)
  ctx.set_forkserver_preload(preload + list(FORKSERVER_PRELOAD))
  return ctx


class _Abort(BaseException):
  """Raised in a worker when its pool ends it (SIGTERM). A BaseException, which verifiers do
  not catch: it unwinds the verification, running its cleanup on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup must run uninterrupted
  raise _Abort()


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
  """Worker loop. Messages in: ("import", module) | ("verify", index, example, completion)
  | None (exit). Messages out: ("ready",) | ("imported", module, error) | ("verdict", ...)."""
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    _serve(conn)
  except _Abort:
    pass


def _serve(conn: multiprocessing.connection.Connection) -> None:
  conn.send(("ready",))
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    if message[0] == "import":
      try:
        importlib.import_module(message[1])
        conn.send(("imported", message[1], ""))
      except Exception as e:  # The item then fails in verify_one as an unknown verifier.
        conn.send(("imported", message[1], f"{type(e).__name__}: {e}"))
      continue
    _, index, example, completion = message
    verdict = verify_one(example, completion)
    try:
      conn.send(("verdict", index, verdict))
    except Exception as e:  # e.g. unpicklable details: keep the judgement, drop the details.
      conn.send(("verdict", index, Verdict(verdict.reward, verdict.success, verdict.feedback,
                                           {"details_dropped": f"{type(e).__name__}: {e}"})))


@dataclasses.dataclass(eq=False)
class _Worker:
  """Parent-side handle. phase: "boot" -> "idle" <-> ("import" ->) "verify" -> "idle"."""

  process: Any
  conn: multiprocessing.connection.Connection
  phase: str = "boot"
  job: int | None = None  # index of the item reserved for / being verified by this worker
  since: float = dataclasses.field(default_factory=time.monotonic)  # when phase began
  imported: set[str] = dataclasses.field(default_factory=set)


def _kill(worker: _Worker, grace_s: float = 0.0) -> None:
  """Ends a worker and what it started (see the module docstring)."""
  try:
    worker.conn.close()
  except OSError:
    pass
  process = worker.process
  if process.is_alive() and grace_s > 0:
    process.terminate()
    process.join(timeout=grace_s)
  if process.is_alive():
    try:
      os.kill(process.pid, signal.SIGSTOP)  # starts no new run while its runs are swept
    except OSError:
      pass
    sandbox.end_runs_of(process.pid)
    process.kill()
  process.join(timeout=5.0)
  sandbox.end_runs_of(process.pid)  # runs of a worker that died mid-run; their temp dirs


class VerifierPool:
  """A managed pool of verification worker processes.

  Unlike `concurrent.futures.ProcessPoolExecutor`, a worker stuck past its item's deadline
  is killed and replaced alone; the other workers and items carry on. Workers start lazily
  and are reused across calls; a worker imports a verifier's module (untimed) before its
  first item for that verifier, so the deadline covers the verification only. Thread-safe:
  concurrent `verify` calls take turns.
  """

  # Starting a worker or importing a verifier module may take this long (a busy machine).
  setup_timeout_s: float = 120.0
  # Give up after this many failed worker starts in a row, or preparations for one item.
  max_setup_failures: int = 3
  # A worker ended mid-item has this long to clean up after itself before SIGKILL.
  abort_grace_s: float = 5.0

  def __init__(self, num_workers: int | None = None):
    self.num_workers = max(1, num_workers or _default_num_workers())
    self._ctx = mp_context()
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self._closed = False

  def _start_worker(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(child_conn,), daemon=True,
                                name="mopd-verifier")
    process.start()
    child_conn.close()
    return _Worker(process=process, conn=parent_conn)

  def _replace(self, worker: _Worker) -> None:
    _kill(worker, self.abort_grace_s)
    self._workers[self._workers.index(worker)] = self._start_worker()

  def verify(self, examples: Sequence[Example], completions: Sequence[str], *,
             deadline_s: float = DEFAULT_DEADLINE_S) -> list[Verdict]:
    """One verdict per (example, completion), in input order. Never raises for an item."""
    if len(examples) != len(completions):
      raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    with self._lock:
      if self._closed:
        raise RuntimeError("VerifierPool is closed")
      try:
        return _Batch(self, list(examples), list(completions), float(deadline_s)).run()
      except BaseException:
        # Interrupted (e.g. KeyboardInterrupt): busy workers still hold this batch's
        # items; replace them so no stale verdict reaches a later batch.
        for worker in list(self._workers):
          if worker.phase != "idle" or worker.job is not None:
            self._replace(worker)
        raise

  def close(self) -> None:
    with self._lock:
      self._closed = True
      for worker in self._workers:
        try:
          worker.conn.send(None)
        except (OSError, EOFError, ValueError):
          pass
      for worker in self._workers:
        worker.process.join(timeout=1.0)
        _kill(worker, self.abort_grace_s)
      self._workers = []

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class _Batch:
  """The scheduling loop of one `VerifierPool.verify` call."""

  def __init__(self, pool: VerifierPool, examples: list[Example], completions: list[str],
               deadline_s: float):
    self.pool, self.examples, self.completions = pool, examples, completions
    self.deadline_s = deadline_s
    self.results: list[Verdict | None] = [None] * len(examples)
    self.pending: collections.deque[int] = collections.deque()
    self.boot_failures = 0  # consecutive failed worker starts
    self.item_failures: dict[int, int] = {}  # failed preparations per item
    for i, example in enumerate(examples):
      try:
        get_verifier(example.verifier)  # Unknown names fail here, without a worker.
        self.pending.append(i)
      except Exception as e:
        self.results[i] = failure_verdict(str(e.args[0] if e.args else e),
                                          error=type(e).__name__)

  def run(self) -> list[Verdict]:
    workers = self.pool._workers
    while len(workers) < min(self.pool.num_workers, len(self.pending)):
      workers.append(self.pool._start_worker())
    while self.pending or any(w.job is not None for w in workers):
      for worker in list(workers):
        if worker.phase == "idle" and self.pending:
          self._assign(worker, self.pending.popleft())
      waiting = [w for w in workers if w.phase != "idle"]
      if not waiting:
        continue
      timeout = max(0.0, min(self._limit(w) for w in waiting) - time.monotonic())
      ready = multiprocessing.connection.wait(
          [w.conn for w in waiting] + [w.process.sentinel for w in waiting], timeout=timeout)
      for worker in waiting:
        if worker.conn in ready or worker.process.sentinel in ready:
          self._receive(worker)
      now = time.monotonic()
      for worker in list(workers):
        if worker.phase != "idle" and now >= self._limit(worker):
          self._expire(worker)
    return list(self.results)  # type: ignore[arg-type]

  def _limit(self, worker: _Worker) -> float:
    budget = self.deadline_s if worker.phase == "verify" else self.pool.setup_timeout_s
    return worker.since + budget

  def _set_phase(self, worker: _Worker, phase: str) -> None:
    worker.phase, worker.since = phase, time.monotonic()

  def _assign(self, worker: _Worker, i: int) -> None:
    module = _verifier_module(self.examples[i].verifier)
    worker.job = i
    try:
      if module and module not in worker.imported:
        worker.conn.send(("import", module))
        self._set_phase(worker, "import")
      else:
        worker.conn.send(("verify", i, self.examples[i], self.completions[i]))
        self._set_phase(worker, "verify")
    except (OSError, EOFError):  # Died while idle: requeue the item, start another worker.
      self._setup_failed(worker)
    except Exception as e:  # Unpicklable item: nothing reached the pipe, the worker is fine.
      self._finish(worker, failure_verdict(
          f"cannot send item to a verifier worker: {type(e).__name__}: {e}",
          error=type(e).__name__))

  def _receive(self, worker: _Worker) -> None:
    try:
      message = worker.conn.recv()
    except (EOFError, OSError):
      worker.process.join(timeout=1.0)
      if worker.phase == "verify":
        self._finish(worker, failure_verdict(
            f"verifier worker died (exit code {worker.process.exitcode}) while verifying with "
            f"{self.examples[worker.job].verifier!r}", error="WorkerDied"))
        self.pool._replace(worker)
      else:
        self._setup_failed(worker)
      return
    except Exception as e:  # A whole message arrived but does not unpickle here.
      if worker.phase == "verify":
        self._finish(worker, failure_verdict(
            f"could not read the verdict of {self.examples[worker.job].verifier!r}: "
            f"{type(e).__name__}: {e}", error=type(e).__name__))
      return
    kind = message[0]
    if kind == "ready":
      self.boot_failures = 0
      self._set_phase(worker, "idle")
    elif kind == "imported":
      worker.imported.add(message[1])
      i = worker.job
      self._set_phase(worker, "idle")
      if i is not None:
        self._assign(worker, i)
    elif kind == "verdict" and message[1] == worker.job:
      self._finish(worker, message[2])

  def _finish(self, worker: _Worker, verdict: Verdict) -> None:
    self.results[worker.job] = verdict
    worker.job = None
    self._set_phase(worker, "idle")

  def _expire(self, worker: _Worker) -> None:
    if worker.phase == "verify":
      self._finish(worker, failure_verdict(
          f"timeout: verification with {self.examples[worker.job].verifier!r} exceeded the "
          f"{self.deadline_s:g} s deadline", error="Timeout"))
      self.pool._replace(worker)
    else:
      self._setup_failed(worker)

  def _setup_failed(self, worker: _Worker) -> None:
    """A worker died or hung while starting or importing: retry its item, a few times."""
    i, worker.job = worker.job, None
    if worker.phase == "boot":
      self.boot_failures += 1
    if i is not None:
      self.item_failures[i] = self.item_failures.get(i, 0) + 1
      if self.item_failures[i] >= self.pool.max_setup_failures:
        self.results[i] = failure_verdict(
            f"could not prepare a verifier worker for {self.examples[i].verifier!r} "
            f"({self.item_failures[i]} failed attempts)", error="WorkerSetup")
      else:
        self.pending.appendleft(i)
    if self.boot_failures >= self.pool.max_setup_failures:  # Workers cannot start at all.
      while self.pending:
        j = self.pending.popleft()
        self.results[j] = failure_verdict("could not start a verifier worker "
                                          f"({self.boot_failures} failed attempts)",
                                          error="WorkerSetup")
    self.pool._replace(worker)


def _default_num_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


_DEFAULT_POOLS: dict[int, VerifierPool] = {}
_DEFAULT_POOLS_LOCK = threading.Lock()


def default_pool(num_workers: int | None = None) -> VerifierPool:
  """A process-wide pool per worker count, reused across `verify_batch` calls."""
  n = max(1, num_workers or _default_num_workers())
  with _DEFAULT_POOLS_LOCK:
    if n not in _DEFAULT_POOLS:
      _DEFAULT_POOLS[n] = VerifierPool(n)
    return _DEFAULT_POOLS[n]


@atexit.register
def _close_default_pools() -> None:
  for pool in _DEFAULT_POOLS.values():
    pool.close()
  _DEFAULT_POOLS.clear()


def verify_batch(examples: Sequence[Example], completions: Sequence[str], *,
                 num_workers: int | None = None,
                 deadline_s: float = DEFAULT_DEADLINE_S,
                 pool: VerifierPool | None = None) -> list[Verdict]:
  """Verifies `completions[i]` against `examples[i]` in worker processes.

  Returns one verdict per item, in input order. Each item gets `deadline_s` seconds of
  worker time; past it the worker is killed and replaced and the item fails with a
  timeout verdict. Only a length mismatch between the two sequences raises.
  """
  pool = pool or default_pool(num_workers)
  return pool.verify(examples, completions, deadline_s=deadline_s)
