"""2 processes x 2 CPU devices (jax.distributed, gloo) reach the params of 1 process x 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes: int, devices_per_process: int, out_dir: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "mp_worker.py"), str(i), str(num_processes), str(port), out_dir],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_reach_the_same_params_as_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  _launch(1, 4, str(one))
  _launch(2, 2, str(two))
  a = np.load(one / "params.npz")
  b = np.load(two / "params.npz")
  initial = np.load(one / "initial.npz")
  assert len(a.files) == len(b.files) > 0
  moved = max(float(np.max(np.abs(a[k] - initial[k]))) for k in a.files)
  assert moved > 1e-3, f"training barely moved the params ({moved}); the comparison would be vacuous"
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)
