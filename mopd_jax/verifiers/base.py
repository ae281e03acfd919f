"""The verifier protocol, the verifier registry, and parallel batch verification.

A verifier judges one completion of one `Example` and returns a `Verdict`. Verifiers are
registered by name; `Example.verifier` names the one that understands its `reference`.

`verify_batch` runs verifications in worker processes with a per-item deadline. It never
raises into the caller: an unknown verifier, an exception, a crashed worker or a timeout all
become a failure verdict (reward 0) whose feedback names what went wrong. A worker that runs
past its deadline is killed and replaced, so the items after it still run.

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
import threading
import time
from typing import Any, Protocol, Sequence, runtime_checkable

from mopd_jax.types import Example, Verdict, failure_verdict

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


def get_verifier(name: str) -> Verifier:
  """The verifier registered as `name`, importing a built-in one on first use."""
  verifier = _REGISTRY.get(name)
  if verifier is None and name in BUILTIN_VERIFIER_MODULES:
    importlib.import_module(BUILTIN_VERIFIER_MODULES[name])
    verifier = _REGISTRY.get(name)
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


# ------------------------------------------------------------------------ worker pool


def mp_context() -> multiprocessing.context.BaseContext:
  """The 'forkserver' context with `FORKSERVER_PRELOAD` (effective if not yet started)."""
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
  return ctx


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
  """Worker loop: receive (index, example, completion, module), reply (index, verdict)."""
  while True:
    try:
      job = conn.recv()
    except (EOFError, OSError):
      return
    if job is None:
      return
    index, example, completion, module = job
    if module and example.verifier not in _REGISTRY:
      try:
        importlib.import_module(module)
      except Exception as e:  # Reported by verify_one as an unknown verifier below.
        del e
    verdict = verify_one(example, completion)
    try:
      conn.send((index, verdict))
    except Exception as e:  # e.g. unpicklable details: keep the judgement, drop the details.
      conn.send((index, Verdict(verdict.reward, verdict.success, verdict.feedback,
                                {"details_dropped": f"{type(e).__name__}: {e}"})))


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: multiprocessing.connection.Connection
  job: int | None = None  # index of the item being verified
  started: float = 0.0  # when that item was sent


def _kill(worker: _Worker) -> None:
  try:
    worker.conn.close()
  except OSError:
    pass
  if worker.process.is_alive():
    worker.process.kill()
  worker.process.join(timeout=5.0)


class VerifierPool:
  """A managed pool of verification worker processes.

  Unlike `concurrent.futures.ProcessPoolExecutor`, a worker stuck past its item's deadline
  is killed and replaced alone; the other workers and items carry on. Workers start lazily
  and are reused across calls. Thread-safe: concurrent `verify` calls take turns.
  """

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

  def verify(self, examples: Sequence[Example], completions: Sequence[str], *,
             deadline_s: float = DEFAULT_DEADLINE_S) -> list[Verdict]:
    """One verdict per (example, completion), in input order. Never raises for an item."""
    if len(examples) != len(completions):
      raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    with self._lock:
      if self._closed:
        raise RuntimeError("VerifierPool is closed")
      return self._run(list(examples), list(completions), float(deadline_s))

  def _run(self, examples: list[Example], completions: list[str],
           deadline_s: float) -> list[Verdict]:
    results: list[Verdict | None] = [None] * len(examples)
    pending = collections.deque()
    for i, example in enumerate(examples):
      try:
        get_verifier(example.verifier)  # Fail unknown names here, without a worker.
        pending.append(i)
      except Exception as e:
        results[i] = failure_verdict(str(e.args[0] if e.args else e), error=type(e).__name__)
    while len(self._workers) < min(self.num_workers, len(pending)):
      self._workers.append(self._start_worker())

    def finish(worker: _Worker, verdict: Verdict) -> None:
      results[worker.job] = verdict
      worker.job = None

    def replace(worker: _Worker) -> None:
      _kill(worker)
      self._workers[self._workers.index(worker)] = self._start_worker()

    while pending or any(w.job is not None for w in self._workers):
      for worker in self._workers:
        if worker.job is None and pending:
          i = pending.popleft()
          job = (i, examples[i], completions[i], _verifier_module(examples[i].verifier))
          try:
            worker.conn.send(job)
          except (OSError, EOFError):  # Worker died while idle: replace it, retry the item.
            pending.appendleft(i)
            replace(worker)
            continue
          except Exception as e:  # Unpicklable example: nothing was written to the pipe.
            results[i] = failure_verdict(f"cannot send item to a worker: "
                                         f"{type(e).__name__}: {e}", error=type(e).__name__)
            continue
          worker.job, worker.started = i, time.monotonic()
      busy = [w for w in self._workers if w.job is not None]
      if not busy:
        continue
      now = time.monotonic()
      wait_s = max(0.0, min(w.started + deadline_s for w in busy) - now)
      ready = multiprocessing.connection.wait(
          [w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s)
      for worker in busy:
        if worker.conn in ready or worker.process.sentinel in ready:
          try:
            index, verdict = worker.conn.recv()
            if index != worker.job:  # Cannot happen with one job in flight; be safe.
              raise EOFError(f"worker answered item {index}, expected {worker.job}")
            finish(worker, verdict)
          except (EOFError, OSError) as e:
            worker.process.join(timeout=1.0)
            finish(worker, failure_verdict(
                f"verifier worker died (exit code {worker.process.exitcode}) while verifying "
                f"with {examples[worker.job].verifier!r}", error="WorkerDied", cause=str(e)))
            replace(worker)
      now = time.monotonic()
      for worker in busy:
        if worker.job is not None and now - worker.started >= deadline_s:
          finish(worker, failure_verdict(
              f"timeout: verification with {examples[worker.job].verifier!r} exceeded the "
              f"{deadline_s:g} s deadline", error="Timeout"))
          replace(worker)
    return [r for r in results]  # type: ignore[misc]

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
        _kill(worker)
      self._workers = []

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


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
