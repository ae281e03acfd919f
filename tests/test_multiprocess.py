"""2 processes x 2 CPU devices (jax.distributed, gloo) reach the params of 1 process x 4 devices,
with the batch, the model (fsdp, tensor) and the sampler spread across the processes."""

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


def _launch(num_processes: int, devices_per_process: int, out_dir: str, mesh: str = "-1,1,1",
            mode: str = "train") -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "mp_worker.py"), str(i), str(num_processes), str(port), out_dir,
       mesh, mode],
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


def _same_params(one, two) -> None:
  a = np.load(one / "params.npz")
  b = np.load(two / "params.npz")
  initial = np.load(one / "initial.npz")
  assert len(a.files) == len(b.files) > 0
  moved = max(float(np.max(np.abs(a[k] - initial[k]))) for k in a.files)
  assert moved > 1e-3, f"training barely moved the params ({moved}); the comparison would be vacuous"
  # 1e-4: Adam's early steps (~ lr * sign(g)) turn float reassociation between the meshes into
  # differences of up to ~8e-5 on a few of ~3M elements (fused projections changed the order
  # of the projection sums); a wrongly split or dropped batch moves params by ~1e-3.
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], atol=1e-4)


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
  """train mode -> the directory of its 1 process x 4 devices (data parallel) run."""
  runs = {}

  def get(mode: str):
    if mode not in runs:
      runs[mode] = tmp_path_factory.mktemp("one-" + mode.replace(":", "-"))
      _launch(1, 4, str(runs[mode]), mode=mode)
    return runs[mode]

  return get


@pytest.mark.slow
@pytest.mark.parametrize("mesh, mode", [
    ("-1,1,1", "train:ema"),  # data parallel: the data axis spans the processes
    ("1,4,1", "train:ema"),  # fsdp over all 4 devices: params, optimizer and teacher sharded across processes
    ("1,2,2", "train:ema"),  # fsdp = 2 across the processes x tensor = 2 within each
    ("1,2,2", "train:trust_region"),
    ("1,2,2", "train:frozen"),
    ("1,2,2", "train:external"),  # its own graphdef and params (the same seeded tiny model as the start)
])
def test_two_processes_reach_the_same_params_as_one(one_process_runs, tmp_path, mesh, mode):
  reference = one_process_runs(mode)
  _launch(2, 2, str(tmp_path), mesh=mesh, mode=mode)
  _same_params(reference, tmp_path)


@pytest.mark.slow
def test_two_processes_sample_what_one_process_samples(tmp_path):
  """One sampling program over a mesh spanning both processes (params sharded fsdp x tensor
  across them), each process feeding its own prompts: the rows equal one process's."""
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  _launch(1, 4, str(one), mesh="1,2,2", mode="sample")
  _launch(2, 2, str(two), mesh="1,2,2", mode="sample")
  for name in ("greedy", "sampled"):
    ref = np.load(one / f"{name}0.npz")
    parts = [np.load(two / f"{name}{p}.npz") for p in (0, 1)]
    assert ref["tokens"].shape[0] == sum(p["tokens"].shape[0] for p in parts) == 16
    for key in ("tokens", "lengths"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), ref[key])
    np.testing.assert_allclose(np.concatenate([p["logprobs"] for p in parts]), ref["logprobs"], atol=1e-6)
    assert ref["lengths"].min() >= 1 and len({tuple(r) for r in ref["tokens"]}) > 1


@pytest.mark.slow
def test_two_process_checkpoints_verify_in_one_process_and_fall_back_together(tmp_path):
  """Arrays sharded across 2 processes (fsdp x tensor): the digests both processes computed for
  the save equal a 1-process digest of the same values; after flipped bytes in the latest step
  both processes find it damaged and resume from the step before (no deadlock, one answer)."""
  import glob

  import jax

  from mopd_jax import checkpointing

  _launch(2, 2, str(tmp_path), mesh="1,2,2", mode="ckpt:2")
  ck = tmp_path / "ck"
  reader = checkpointing.RunCheckpointer(ck, async_save=False)
  assert reader.all_steps() == [1, 2]
  for step in (1, 2):
    raw = _on_one_device(reader, step)
    assert checkpointing.verify(raw, checkpointing.read_checksums(ck / str(step))) == []
    assert len(jax.tree.leaves(raw)) > 10
  reader.close()
  files = glob.glob(str(ck / "2" / "arrays" / "**" / "d" / "*"), recursive=True)
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(64):
    data[len(data) // 3 + 97 * i] ^= 0xFF
  open(path, "wb").write(bytes(data))
  _launch(2, 2, str(tmp_path), mesh="1,2,2", mode="ckpt:3")
  assert [(tmp_path / f"resumed{p}.txt").read_text() for p in (0, 1)] == ["1", "1"]
  assert sorted(os.listdir(ck / checkpointing.QUARANTINE_DIR)) == ["2"]
  reader = checkpointing.RunCheckpointer(ck, async_save=False)
  assert reader.all_steps() == [1, 2, 3]
  assert checkpointing.verify(_on_one_device(reader, 3), checkpointing.read_checksums(ck / "3")) == []


def _on_one_device(reader, step):
  """A step's arrays read unverified onto this (single) process's first device."""
  import jax
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          reader._manager.item_metadata(step)["arrays"])
  return reader._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))).arrays
