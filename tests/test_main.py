"""`python -m mopd_jax.main`: quiet by default (progress, evaluations and warnings; no library
INFO lines), absl's --verbosity brings the INFO lines back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# `python -m mopd_jax.main`, with a library's warning and info logged mid-run through python
# logging, the way orbax logs (the tiny run logs no warning of its own).
_MAIN_WITH_CANARY = r"""
import logging, runpy
from mopd_jax import trainer

def train(config, _train=trainer.train):
  logging.getLogger("orbax.canary").warning("canary warning")
  logging.getLogger("orbax.canary").info("canary info")
  return _train(config)

trainer.train = train
runpy.run_module("mopd_jax.main", run_name="__main__", alter_sys=True)
"""

ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's prefix: I, then month and day
ABSL_WARNING = re.compile(r"^W\d{4} .*canary warning$", re.MULTILINE)


def _run_main(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
  """One step of configs/tiny.py that saves a checkpoint (orbax's ~60 INFO lines), no evaluation."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  args = [f"--config={REPO / 'configs' / 'tiny.py'}", "--config.train.steps=1", "--config.eval.at_start=False",
          "--config.eval.at_end=False", "--config.checkpoint.every=1", f"--config.checkpoint.dir={tmp_path / 'ck'}",
          f"--config.logging.dir={tmp_path / 'log'}", *flags]
  out = subprocess.run([sys.executable, "-c", _MAIN_WITH_CANARY, *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "ck" / "1").is_dir(), os.listdir(tmp_path / "ck")
  assert "[mopd] finished 1 steps" in out.stdout
  return out


def test_a_run_shows_warnings_but_no_library_info_lines(tmp_path):
  err = _run_main(tmp_path).stderr
  assert not ABSL_INFO.search(err), err[:3000]
  assert "canary info" not in err
  assert ABSL_WARNING.search(err), err[:3000]


@pytest.mark.slow  # a second run, ~20 s on 2 CPU cores
def test_absl_verbosity_brings_the_info_lines_back(tmp_path):
  err = _run_main(tmp_path, "--verbosity=0").stderr
  assert len(ABSL_INFO.findall(err)) > 10, err[:3000]  # orbax's, saving the checkpoint
  assert "canary info" in err and ABSL_WARNING.search(err)
