"""Orbax checkpoints: params pytrees, and the trainer's full resumable state.

Orbax writes each step into a temporary directory and renames it into place only when
complete, so a crash during a save leaves the previous step as the latest good one; the
manager never lists unfinished steps.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


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


class RunCheckpointer:
  """The trainer's checkpoints: {train state, teacher state, rng} arrays + RunPosition."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, arrays: Any, position: RunPosition) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), position=ocp.args.JsonSave(dataclasses.asdict(position))))

  def restore(self, like: Any, step: Optional[int] = None, shardings: Any = None) -> tuple[Any, RunPosition]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(_abstract_like(like, shardings)), position=ocp.args.JsonRestore()))
    return restored.arrays, RunPosition(**restored.position)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
