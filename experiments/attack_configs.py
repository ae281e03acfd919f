"""Replays the config and checkpoint cases of the outside attack run; prints case -> outcome.

Configs (each must be a `ConfigError` naming the field, raised by `config_lib.validate` before
any model loads): mesh.data=0, data.train_size=0, sampling.max_new_tokens=0, checkpoint.every=0,
verifier.deadline_s=-1, optim.lr=inf, and a few neighbours of each.

Checkpoints, through the trainer on the tiny model (`configs/default.py:tiny`, 2 steps saved):
  bit_rot        64 flipped bytes in the latest step: the run must name the step and the tensor,
                 resume from the step before, train on, and save a step that verifies
  all_corrupt    every step damaged: a clear error, nothing moved or overwritten
  empty_step     an empty latest step directory: named, the previous step resumed
  another_model  a checkpoint of a wider model: refused in one short line naming the first
                 mismatching tensor and both shapes

    python experiments/attack_configs.py

Exit status 1 when a case was not handled.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import shutil
import tempfile

from configs import default as default_config
from mopd_jax import checkpointing, config_lib, trainer

CONFIG_CASES = [
    ("mesh.data", 0), ("mesh.fsdp", -2), ("data.train_size", 0), ("data.eval_size", -1),
    ("sampling.max_new_tokens", 0), ("eval.max_new_tokens", 0), ("checkpoint.every", 0), ("checkpoint.keep", 0),
    ("verifier.deadline_s", -1.0), ("verifier.deadline_s", math.nan), ("verifier.num_workers", 0),
    ("optim.lr", math.inf), ("optim.lr", math.nan), ("optim.warmup_steps", -1), ("optim.b2", 1.0),
    ("sampling.temperature", math.inf),
]


def tiny_config(ckpt_dir: str, log_dir: str, steps: int = 2):
  c = default_config.get_config("tiny")
  c.eval.at_start = c.eval.at_end = False
  c.checkpoint.dir, c.logging.dir = ckpt_dir, log_dir
  c.checkpoint.every = 1
  c.train.steps = steps
  return c


def set_field(c, key: str, value) -> None:
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with c.unlocked():
    node[leaf] = value


def config_case(key: str, value) -> tuple[bool, str]:
  c = default_config.get_config("tiny")
  set_field(c, key, value)
  try:
    config_lib.validate(c, num_devices=1)
  except config_lib.ConfigError as e:
    return f"config.{key}" in str(e), str(e)
  except Exception as e:  # noqa: BLE001 - any other exception is the finding
    return False, f"{type(e).__name__}: {e}"
  return False, "accepted"


def largest_array_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, "arrays", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def flip_bytes(path: str, count: int = 64) -> None:
  data = bytearray(open(path, "rb").read())
  for i in range(count):
    data[len(data) // 3 + 97 * i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def resume(ckpt: str, log: str, steps: int = 2):
  """(setup's stderr, the run) for a rerun of the same command."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    run = trainer.setup(tiny_config(ckpt, log, steps))
  return err.getvalue(), run


def checkpoint_cases(root: str) -> list[tuple[str, bool, str]]:
  trained = os.path.join(root, "trained")
  trainer.train(tiny_config(trained, os.path.join(root, "log0")))
  out = []

  def fresh(name: str) -> str:
    d = os.path.join(root, name)
    shutil.copytree(trained, d)
    return d

  d = fresh("bit_rot")
  flip_bytes(largest_array_file(os.path.join(d, "2")))
  err, run = resume(d, os.path.join(root, "log1"))
  # Flipped bytes in a compressed chunk fail to decode before the digest is reached: both name the tensor.
  named = "checkpoint step 2" in err and ("digest mismatch" in err or "Error reading" in err)
  resumed = run.position.step == 1
  run.checkpointer.close()
  summary = trainer.train(tiny_config(d, os.path.join(root, "log1")))
  check = checkpointing.RunCheckpointer(d, async_save=False)
  _, position = check.restore(run.checkpoint_arrays())
  check.close()
  out.append(("bit_rot", named and resumed and summary.steps == 2 and position.step == 2,
              f"resumed from step {run.position.step}; then trained to {summary.steps}; "
              f"{err.strip().splitlines()[0][:150] if err.strip() else 'no warning'}"))

  d = fresh("all_corrupt")
  for step in ("1", "2"):
    flip_bytes(largest_array_file(os.path.join(d, step)))
  before = sorted(os.listdir(d))
  try:
    resume(d, os.path.join(root, "log2"))
    out.append(("all_corrupt", False, "restored"))
  except checkpointing.CheckpointCorruptError as e:
    out.append(("all_corrupt", sorted(os.listdir(d)) == before, f"{str(e).splitlines()[0][:150]}"))

  d = fresh("empty_step")
  shutil.rmtree(os.path.join(d, "2"))
  os.makedirs(os.path.join(d, "2"))
  err, run = resume(d, os.path.join(root, "log3"))
  run.checkpointer.close()
  out.append(("empty_step", run.position.step == 1 and "step 2" in err,
              f"resumed from step {run.position.step}; {err.strip().splitlines()[0][:150] if err.strip() else ''}"))

  d = fresh("another_model")
  c = tiny_config(d, os.path.join(root, "log4"))
  c.model.preset = "tiny-qwen3"  # another architecture and width than the saved tiny-llama
  try:
    trainer.setup(c)
    out.append(("another_model", False, "restored"))
  except checkpointing.CheckpointMismatchError as e:
    text = str(e)
    # The first mismatching tensor: a shape pair, or a tensor the checkpoint lacks (another architecture).
    names = " vs model " in text or "not in the checkpoint" in text
    out.append(("another_model", len(text) < 1024 and names, f"{len(text)} chars: {text[:160]}"))
  except Exception as e:  # noqa: BLE001
    out.append(("another_model", False, f"{type(e).__name__}: {str(e)[:160]} ({len(str(e))} chars)"))
  return out


def main() -> int:
  rows = [(f"{k}={v}", *config_case(k, v)) for k, v in CONFIG_CASES]
  with tempfile.TemporaryDirectory() as root:
    rows += checkpoint_cases(root)
  width = max(len(r[0]) for r in rows)
  print(f"{'case':<{width}}  outcome    details")
  for name, ok, details in rows:
    print(f"{name:<{width}}  {'handled' if ok else 'NOT HANDLED':<9}  {details[:170]}")
  return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
  raise SystemExit(main())
