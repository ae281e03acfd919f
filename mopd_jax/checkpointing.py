"""Orbax checkpoints: params pytrees, and the trainer's full resumable state.

Orbax writes each step into a temporary directory and renames it into place only when
complete, so a crash during a save leaves the previous step as the latest good one; the
manager never lists unfinished steps.

What orbax does not catch is a finished step damaged afterwards: flipped bytes inside a
zstd chunk decode to other numbers and restore without a word. So every trainer step also
holds `checksums`, a 64-bit digest per array (`array_digests`), and `RunCheckpointer.restore`
verifies them, with the array metadata, position and file layout. A damaged step is reported
(naming the tensor or file), moved into `quarantine/` and the previous step restored; if no
step is good the restore stops. The digest is an order-independent sum of per-element hashes
computed by a jitted integer reduction on the arrays themselves: exact whatever the sharding
or the reduction order, so every process of a multi-process run computes the same value from
its own shards, and a step saved on one mesh verifies when restored onto another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _abstract_like(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with target shardings) describing how to restore `tree`."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(path: str | os.PathLike, params: Any) -> None:
  """Save one params pytree (blocking)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def restore_params(path: str | os.PathLike, like: Any, shardings: Any = None) -> Any:
  """Restore a params pytree with the structure of `like`, placed with `shardings`
  (default: the shardings of `like`'s arrays)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path), _abstract_like(like, shardings))


@dataclasses.dataclass(frozen=True)
class RunPosition:
  """Host-side progress saved next to the arrays (JSON)."""

  step: int
  data_position: int  # prompts consumed from the training stream
  nonfinite_in_a_row: int = 0


class CheckpointCorruptError(RuntimeError):
  """No checkpoint step in the directory passed verification (each step's problem is named)."""


class CheckpointMismatchError(ValueError):
  """The checkpoint holds another model (or another run's state): not damage, so no fallback."""


# ----------------------------------------------------------------------------- checksums

CHECKSUM_ALGORITHM = "fmix32x2-sum-v1"
QUARANTINE_DIR = "quarantine"  # damaged steps are moved here (never deleted): not a step for orbax
_log = logging.getLogger(__name__)


def tensor_name(path) -> str:
  """A pytree key path as orbax names the array: "state.params.layers.mlp.up_proj.kernel.value"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _fmix32(h):
  """murmur3's finalizer: a bijection on uint32 that mixes every input bit into every output bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (narrower dtypes widened; a trailing axis for 64-bit ones)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _digest(x: jax.Array) -> jax.Array:
  """[2] uint32: sum_i fmix(w_i ^ s_i) and sum_i fmix((w_i + c) * (s_i | 1)), s_i = fmix(i + c').

  Integer sums wrap mod 2^32 and are associative, so the value is exact under any sharding and
  reduction order (a digest, not a float reduction). Each term is a bijection of the word at
  its position, so any single changed word changes both lanes; several changes (or moved
  elements, the position is hashed in) cancel with probability ~2^-32 per lane. It detects
  damage, not tampering (not a cryptographic hash). Positions are taken mod 2^32.
  """
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2**32)
    stride *= w.shape[axis]
  salt = _fmix32(index + np.uint32(0x9E3779B9))
  one = _fmix32(w ^ salt)
  two = _fmix32((w + np.uint32(0x7F4A7C15)) * (salt | np.uint32(1)))
  # Both lanes in one variadic reduce: one pass over the array (XLA:CPU ran two jnp.sum 8x slower).
  zero = np.uint32(0)
  one, two = jax.lax.reduce((one, two), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(w.ndim)))
  return jnp.stack([one, two])


_digest_jit = jax.jit(_digest)  # one small program per (shape, dtype, sharding): params, moments, teacher share them


def array_digests(tree: Any) -> dict[str, str]:
  """{tensor name: 16 hex digits} for every array leaf of `tree`. Blocks until computed.

  Every process of a multi-process run must call it with the same (global) arrays: each digest
  is a jitted program over the whole array (each process reducing its own shards, then an
  integer all-reduce), and every process gets the same values.
  """
  flat = [(tensor_name(p), x if isinstance(x, jax.Array) else jnp.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  out = {}
  for name, x in flat:
    # One at a time, each finished before the next starts: across processes (gloo on CPU) two
    # collective programs in flight at once deadlocked the 2-process test.
    v = jax.block_until_ready(_digest_jit(x))
    if not v.is_fully_addressable:  # replicated over processes: any local copy is the value
      v = v.addressable_data(0)
    one, two = (int(w) for w in np.asarray(v))
    out[name] = f"{one:08x}{two:08x}"
  return out


def checksums_record(tree: Any) -> dict[str, Any]:
  """The `checksums` item saved with a step: algorithm, and per tensor digest, shape, dtype."""
  digests = array_digests(tree)
  leaves = {tensor_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {"algorithm": CHECKSUM_ALGORITHM, "arrays": {
      name: {"digest": d, "shape": list(np.shape(leaves[name])), "dtype": str(jnp.result_type(leaves[name]))}
      for name, d in digests.items()}}


def verify(tree: Any, record: dict[str, Any], prefix: str = "") -> list[str]:
  """Problems (empty: verified) of `tree`'s arrays against a `checksums_record`; `prefix`
  names where `tree` sits in the saved tree (a partial restore: "state.params")."""
  if not isinstance(record, dict) or record.get("algorithm") != CHECKSUM_ALGORITHM or not isinstance(
      record.get("arrays"), dict):
    return [f"checksums: not a {CHECKSUM_ALGORITHM} record"]
  stored = record["arrays"]
  problems = []
  for name, digest in array_digests(tree).items():
    name = f"{prefix}.{name}" if prefix else name
    entry = stored.get(name)
    if not isinstance(entry, dict) or "digest" not in entry:
      problems.append(f"{name}: no digest in the checksums")
    elif entry["digest"] != digest:
      problems.append(f"{name}: digest mismatch (saved {entry['digest']}, read {digest})")
  return problems


def read_checksums(step_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
  """A step's `checksums` item (None: the step was saved before checksums existed)."""
  path = os.path.join(str(step_dir), "checksums", "metadata")
  if not os.path.exists(path) and "checksums" not in _step_items(step_dir):
    return None
  with open(path) as f:
    return json.load(f)


def _step_items(step_dir: str | os.PathLike) -> set[str]:
  """The items orbax recorded for a step (its `_CHECKPOINT_METADATA`)."""
  with open(os.path.join(str(step_dir), "_CHECKPOINT_METADATA")) as f:
    return set(json.load(f)["item_handlers"])


def _short_error(e: BaseException, root: str, limit: int = 400) -> str:
  """One line from an orbax / TensorStore failure (theirs run to kilobytes of spec): the part
  naming the tensor and file, paths relative to the checkpoint directory."""
  messages, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    messages.append(f"{type(e).__name__}: {e}")
    e = e.__cause__ or e.__context__
  text = messages[0]
  for m in messages:  # TensorStore: 'Error reading "<tensor>/<chunk>" in OCDBT database at local file ...'
    hit = re.search(r'Error reading "([^"/]+)/[^"]*".*', m)
    if hit:
      text = f"{hit.group(1)}: {hit.group(0)}"
      break
  text = text.splitlines()[0].replace(root.rstrip("/") + "/", "").split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[:limit] + "..."


# The JSON files orbax and this module write into a step (checked to parse before restoring,
# so a damaged one is named; orbax's own error would not say which file).
_JSON_FILES = ("_CHECKPOINT_METADATA", os.path.join("arrays", "_METADATA"), os.path.join("arrays", "_sharding"),
               os.path.join("position", "metadata"), os.path.join("checksums", "metadata"))


def _listdir(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


class _BadStep(Exception):
  """A step that cannot be restored as saved (the message names the tensor or file)."""


def _agree(bad: bool) -> bool:
  """True if any process found the step bad: all processes then take the same path."""
  if jax.process_count() == 1:
    return bad
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bad))))


@dataclasses.dataclass
class _LatestAndPinned:
  """orbax preservation policy: the newest `keep` steps, and the pinned ones (this run's
  restored step, verified good: its fallback until a later run verifies a newer one)."""

  keep: int
  pinned: set = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    n = len(checkpoints)  # oldest first
    return [i >= n - self.keep or c.step in self.pinned for i, c in enumerate(checkpoints)]


# ----------------------------------------------------------------------------- the trainer's checkpoints


class RunCheckpointer:
  """The trainer's checkpoints: {train state, teacher state, rng} arrays + RunPosition + checksums."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self._policy = _LatestAndPinned(keep=keep)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=self._policy, create=True, enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    if jax.process_count() > 1:
      # orbax's barriers through the distributed client: its default barrier is a device
      # collective, which an async save runs from a background thread, where it can meet the
      # training step's collectives in another order on each process (and deadlock).
      options.multiprocessing_options = ocp.options.MultiprocessingOptions(
          primary_host=0, active_processes=set(range(jax.process_count())))
      options.create = False  # orbax refuses to create the directory with active_processes set
      os.makedirs(self.directory, exist_ok=True)  # a shared filesystem: every process may
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "arrays": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, arrays: Any, position: RunPosition) -> None:
    # Digests of these very arrays, computed (blocking) before orbax copies them and before a
    # later step can donate their buffers: the checksums are of exactly what is handed over.
    # After the previous save has finished (orbax's save waits for it anyway), so no orbax
    # thread runs collectives meanwhile.
    self._manager.wait_until_finished()
    checksums = checksums_record(arrays)
    saved = self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), position=ocp.args.JsonSave(dataclasses.asdict(position)),
        checksums=ocp.args.JsonSave(checksums)))
    if not saved:
      _log.warning("checkpoint step %d was not saved: orbax declined (latest step %s)", step, self.latest_step())

  def restore(self, like: Any, step: Optional[int] = None, shardings: Any = None,
              warn: Optional[Callable[[str], None]] = None) -> tuple[Any, RunPosition]:
    """The latest good step (or `step`, which must be good), verified against its checksums.

    A damaged step (unreadable or missing file, truncated data, digest mismatch, empty
    directory) is reported through `warn` naming the tensor or file, moved into
    `quarantine/`, and the step before is tried. Raises CheckpointCorruptError when no step is
    good (moving nothing, so a rerun stops the same way), CheckpointMismatchError when the
    checkpoint holds another model (not damage: no fallback).
    """
    warn = warn or _log.warning
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    bad: list[tuple[int, str]] = []
    for s in steps:
      try:
        arrays, position = self._restore_verified(s, like, shardings, warn)
      except _BadStep as e:
        bad.append((s, str(e)))
        continue
      for b, reason in bad:
        moved = self._quarantine(b)
        warn(f"checkpoint step {b} in {self.directory} is damaged: {reason}. Moved to {moved}; "
             f"resuming from step {s}")
      self._policy.pinned.add(s)  # later saves of this run keep it, whatever checkpoint.keep says
      return arrays, position
    listing = "; ".join(f"step {b}: {reason}" for b, reason in bad)
    raise CheckpointCorruptError(
        f"no good checkpoint in {self.directory}: {listing}. Nothing was moved or deleted; move the damaged "
        "steps away (or point checkpoint.dir elsewhere) to start over")

  def _restore_verified(self, step: int, like: Any, shardings: Any, warn) -> tuple[Any, RunPosition]:
    step_dir = os.path.join(self.directory, str(step))
    rel = os.path.relpath(step_dir, self.directory)
    problem = None
    try:
      if not os.listdir(step_dir):
        raise _BadStep("empty step directory")
      for name in _JSON_FILES + tuple(
          os.path.join("arrays", "array_metadatas", f) for f in _listdir(os.path.join(step_dir, "arrays", "array_metadatas"))):
        try:
          if name == "_CHECKPOINT_METADATA" or os.path.exists(os.path.join(step_dir, name)):
            with open(os.path.join(step_dir, name)) as f:
              json.load(f)
        except Exception as e:
          raise _BadStep(f"{rel}/{name} unreadable: {_short_error(e, self.directory)}") from None
      items = _step_items(step_dir)
      for item in ("arrays", "position"):
        if item not in items or not os.path.isdir(os.path.join(step_dir, item)):
          raise _BadStep(f"{rel}/{item} missing")
      # Read through the handlers, not the manager: its restore ends in a barrier that a process
      # whose read failed would skip, leaving the others in it (multi-process).
      handler = ocp.StandardCheckpointHandler()
      try:
        stored = handler.metadata(epath.Path(step_dir) / "arrays")
        stored = {tensor_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
                  if hasattr(m, "shape")}
      except Exception as e:
        raise _BadStep(f"array metadata ({rel}/arrays) unreadable: {_short_error(e, self.directory)}") from None
      check_same_model(stored, like, f"checkpoint step {step} in {self.directory}")
      record = None
      if "checksums" in items:
        try:
          record = read_checksums(step_dir)
        except Exception as e:
          raise _BadStep(f"checksums ({rel}/checksums/metadata) unreadable: {_short_error(e, self.directory)}"
                         ) from None
      try:
        # Read as saved (dtype included) so the digests compare bits; cast to `like` after.
        if shardings is None:
          shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), like)
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x, sh: jax.ShapeDtypeStruct(x.shape, stored[tensor_name(p)].dtype, sharding=sh),
            like, shardings)
        arrays = handler.restore(epath.Path(step_dir) / "arrays", args=ocp.args.StandardRestore(abstract))
      except Exception as e:
        raise _BadStep(_short_error(e, self.directory)) from None
      try:
        with open(os.path.join(step_dir, "position", "metadata")) as f:
          position = RunPosition(**json.load(f))
      except Exception as e:
        raise _BadStep(f"position ({rel}/position/metadata) unreadable: {_short_error(e, self.directory)}"
                       ) from None
    except _BadStep as e:
      problem = str(e)
    if _agree(problem is not None):
      raise _BadStep(problem or "damaged on another process")
    if record is None:
      warn(f"checkpoint step {step} in {self.directory} has no checksums (saved before they existed); "
           "restored unverified")
    else:
      problems = verify(arrays, record)
      if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _BadStep(problems[0] + more)
    arrays = jax.tree.map(lambda x, l: x.astype(l.dtype) if x.dtype != l.dtype else x, arrays, like)
    return arrays, position

  def _quarantine(self, step: int) -> str:
    """Move a damaged step out of orbax's sight (it would count against `keep` and block saves
    of steps <= its number); kept for inspection, never deleted."""
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(self.directory, QUARANTINE_DIR)
    dst = os.path.join(dst_dir, str(step))
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(dst_dir, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(dst_dir, exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mopd_quarantine_{step}")
    self._manager.reload()
    return dst

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _shape(x) -> tuple:
  return tuple(int(d) for d in x.shape)


def check_same_model(stored: dict[str, Any], like: Any, where: str) -> None:
  """Raise CheckpointMismatchError naming the first tensor whose path or shape differs.
  stored: {tensor name: anything with a .shape} (orbax's metadata, or a checksums record's)."""
  wanted = {tensor_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
  problems = []
  for name, x in wanted.items():
    if name not in stored:
      problems.append(f"{name}: model {_shape(x)}, not in the checkpoint")
    elif _shape(stored[name]) != _shape(x):
      problems.append(f"{name}: checkpoint {_shape(stored[name])} vs model {_shape(x)}")
  problems += [f"{name}: checkpoint {_shape(m)}, not in the model" for name, m in stored.items() if name not in wanted]
  if problems:
    more = f" (and {len(problems) - 1} more mismatching tensors)" if len(problems) > 1 else ""
    if all(p.startswith("state.opt_state.") for p in problems):
      raise CheckpointMismatchError(
          f"{where} holds the same model with another optimizer state: {problems[0]}{more}. A checkpoint saved "
          "before the optimizer was wrapped in optax.apply_if_finite (2026-12-02) cannot resume; its params "
          "still load (docs/GOTCHAS.md)")
    raise CheckpointMismatchError(f"{where} holds another model: {problems[0]}{more}")


# --------------------------------------------------------------------------------------------
# Reading saved runs without a RunCheckpointer (evaluation, analysis): the layout stays here.

RUN_PARAMS = {"student": "state", "teacher": "teacher"}  # which params -> the arrays item holding them


def run_steps(directory: str | os.PathLike) -> list[int]:
  """The finished steps of a `RunCheckpointer` directory, ascending (quarantine/ is no step)."""
  root = str(directory)
  return sorted(int(n) for n in _listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "arrays")))


def is_run_dir(path: str | os.PathLike) -> bool:
  """A `RunCheckpointer` directory holding at least one finished step."""
  return bool(run_steps(path))


def is_params_dir(path: str | os.PathLike) -> bool:
  """A `save_params` directory (orbax's metadata, and not an HF checkpoint's config.json)."""
  path = str(path)
  return (os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
          and not os.path.exists(os.path.join(path, "config.json")))


def restore_run_params(directory: str | os.PathLike, like: Any, *, step: Optional[int] = None,
                       which: str = "student") -> tuple[Any, int]:
  """Params from a `RunCheckpointer` directory (latest step by default), in `like`'s dtypes and shardings.

  Partial restore: only `state.params` (student) or `teacher.params` is read, so neither the
  optimizer state's structure nor the training config is needed. Verified against the step's
  checksums (a damaged step raises, naming the tensor: no silent fallback to another step).
  """
  if which not in RUN_PARAMS:
    raise ValueError(f"config.evaluate.params must be 'student' or 'teacher', got {which!r}")
  root = os.path.abspath(directory)
  steps = run_steps(root)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint step in {root}")
  step = steps[-1] if step is None or step < 0 else step
  if step not in steps:
    raise FileNotFoundError(f"config.evaluate.step: no step {step} in {root}; steps: {steps}")
  key = RUN_PARAMS[which]
  prefix = f"{key}.params"
  where = f"{root} step {step}"
  step_dir = os.path.join(root, str(step))
  try:
    record = read_checksums(step_dir)  # None: saved before checksums existed
  except Exception as e:
    raise CheckpointCorruptError(
        f"{where}: checksums unreadable ({type(e).__name__}: {e}); evaluate another step (config.evaluate.step; "
        f"steps: {steps})") from None
  saved = {} if record is None else {
      n[len(prefix) + 1:]: jax.ShapeDtypeStruct(tuple(v["shape"]), v["dtype"])
      for n, v in record.get("arrays", {}).items() if n.startswith(prefix + ".")}
  if saved:
    check_same_model(saved, like, where)
  # Read in the saved dtype, so the digests compare the bits written; cast to the model's after.
  abstract = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(
          x.shape, saved[tensor_name(p)].dtype if saved else x.dtype, sharding=x.sharding), like)
  item = {key: {"params": abstract}}
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(epath.Path(step_dir) / "arrays", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  params = out[key]["params"]
  if record is not None:
    problems = verify(params, record, prefix=prefix)
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise CheckpointCorruptError(
          f"{where} is damaged: {problems[0]}{more}; evaluate another step (config.evaluate.step; steps: {steps})")
  return jax.tree.map(lambda x, l: x.astype(l.dtype) if x.dtype != l.dtype else x, params, like), step
