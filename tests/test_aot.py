"""mopd_jax.aot: the run's programs compiled for a TPU topology from this CPU process (libtpu,
i.e. jax[tpu] from requirements-test.txt), through the functions the CLI uses and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from mopd_jax import aot, config_lib, flops, methods
from mopd_jax.models import get_preset
from mopd_jax.train_step import StepConfig
from mopd_jax.weights import loading as model_loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x1"  # 4 chips, one host
PROGRAMS = ["train_step", "sample_prefill", "sample_decode", "teacher_score"]


def _topology(name: str = TOPOLOGY) -> aot.Topology:
  try:
    return aot.get_topology(name)
  except aot.AotError as e:
    if "not installed" in str(e):
      pytest.fail(f"compiling for a TPU needs libtpu (pip install -r requirements-test.txt): {e}")
    raise


def _tiny(attention_impl: str = "xla", mesh=(1, 2, 2)):
  """configs/tiny.py on a data x fsdp x tensor mesh (its dims divide by 2: heads 4, kv heads 2,
  hidden 64, MLP 128, vocab 128)."""
  c = tiny.get_config(None)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.model.attention_impl = attention_impl
  return c


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mopd_jax.aot", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("attention_impl", ["xla", "splash"])
def test_tiny_config_compiles_every_program_on_a_fsdp_tensor_mesh(attention_impl):
  report = aot.compile_all(_tiny(attention_impl), _topology())
  assert [p.name for p in report.programs] == PROGRAMS
  assert report.mesh == {"data": 1, "fsdp": 2, "tensor": 2} and report.num_devices == 4
  assert report.device_kind == "TPU v5" and report.hbm_bytes_per_device == int(95.74 * aot.GIB)
  assert report.all_fit and report.exit_code == 0
  for p in report.programs:
    assert p.fits and not p.skipped and not p.error, p
    assert p.live_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes > 0
    assert p.model_flops > 0 and p.xla_flops_per_device > 0 and p.code_bytes > 0
    assert p.model_flops_per_device == pytest.approx(p.model_flops / 4)
  train = report.programs[0]
  assert train.shapes == "8 rows: student 64+16, teacher 256+16"  # 2 prompts x 4 rollouts
  assert train.alias_bytes > 0  # the donated train and teacher states
  # One decode step: all its outputs are written into its donated carry (not aliased: only the
  # result tuple's table of buffers, 64 bytes).
  decode = report.programs[2]
  assert decode.alias_bytes > 0 and 0 <= decode.output_bytes - decode.alias_bytes <= 128
  kernels = {p.name: p.mosaic_kernels for p in report.programs}
  if attention_impl == "splash":  # the compiled Pallas kernel, not the CPU interpreter
    assert kernels["train_step"] > 0 and kernels["teacher_score"] > 0
  else:
    assert not any(kernels.values())


def test_splash_compiles_on_a_data_fsdp_tensor_mesh():
  """All three mesh axes > 1: v4:2x2x1 has 8 devices on one host (one per TensorCore)."""
  c = _tiny("splash", mesh=(2, 2, 2))
  c.data.prompts_per_step = 4  # divisible by data x fsdp = 4: a prompt's rollouts stay on one shard
  report = aot.compile_all(c, _topology("v4:2x2x1"))
  assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 2} and report.num_devices == 8
  assert report.all_fit and report.exit_code == 0
  kernels = {p.name: p.mosaic_kernels for p in report.programs}
  assert kernels["train_step"] > 0 and kernels["teacher_score"] > 0 and kernels["sample_prefill"] > 0


def test_cli_writes_the_report_as_json(tmp_path):
  path = tmp_path / "aot.json"
  out = _cli("--config=configs/tiny.py", f"--topology={TOPOLOGY}", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
             "--programs=train", f"--json={path}")
  assert out.returncode == 0, out.stderr
  data = json.loads(path.read_text())
  assert data["topology"] == TOPOLOGY and data["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  (train,) = data["programs"]
  assert train["name"] == "train_step" and train["fits"] and train["live_bytes"] > 0
  assert "train_step" in out.stdout and "live" in out.stdout
  # libtpu's warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are silenced.
  assert "TPU_ACCELERATOR_TYPE" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr, out.stderr


def test_a_program_that_does_not_fit_exits_1_with_both_numbers():
  # 16384 prompts x 4 rollouts of the tiny model on a v5e chip (15.75 GiB): ~29 GiB per chip.
  out = _cli("--config=configs/tiny.py", "--topology=v5e:2x2", "--config.mesh.data=-1",
             "--config.data.prompts_per_step=16384", "--programs=train")
  assert out.returncode == 1, out.stdout + out.stderr
  assert "Traceback" not in out.stderr
  needed, available = aot.parse_oom(out.stdout)
  assert available == int(15.75 * aot.GIB) and needed > available
  assert f"train_step: needs {aot.fmt_bytes(needed)} per chip, TPU v5 lite has 15.75 GiB" in out.stderr


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(aot.AotError, match=r"--topology='v9z:2x2': .*examples: v4:2x2x1, v5e:2x2"):
    aot.get_topology("v9z:2x2")
  with pytest.raises(aot.AotError, match=r"expected <generation>:<chips per axis>"):
    aot.get_topology("v5p-8")
  out = _cli("--config=configs/tiny.py", "--topology=v9z:2x2")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "error: --topology='v9z:2x2'" in out.stderr and "v5p:2x2x1" in out.stderr


def test_a_mesh_that_does_not_use_the_topology_is_a_config_error():
  topology = _topology()
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh: data x fsdp x tensor = 1 x 1 x 1 = 1 devices, "
                                                   r"but topology v5p:2x2x1 has 4"):
    aot.make_plan(_tiny(mesh=(1, 1, 1)), topology)
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh: \(3, 1, 1\) does not fit 4 devices"):
    aot.make_plan(_tiny(mesh=(3, 1, 1)), topology)


def test_plan_reads_no_data_and_takes_processes_from_the_topology():
  c = _tiny(mesh=(-1, 1, 1))
  c.data.task, c.data.path = "jsonl", "/nowhere/train.jsonl"  # the run's file, absent here
  c.data.prompts_per_step = 8  # in all: 4 per process, 8 prompts over 8 data shards
  c.sampling.max_new_tokens = 12  # rounds up to the response bucket 16
  plan = aot.make_plan(c, _topology("v5p:2x2x2"))  # 8 chips on 2 hosts
  assert plan.processes == 2 and plan.config.distributed.num_processes == 2
  assert plan.rows == 8 * 4 and plan.sample_prompts == 8  # one sampling program over both hosts
  assert plan.response_len == 16 and plan.prompt_len == 64 and plan.teacher_prompt_len == 256
  assert c.data.path == "/nowhere/train.jsonl"  # the caller's config is untouched


SMALLEST = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@pytest.mark.parametrize("kind", aot.CHIP_KINDS, ids=lambda k: k.name)
def test_hbm_table_matches_the_compiler(kind):
  """Each kind's usable HBM is the figure the compiler prints for a program too large for it."""
  topology = _topology(SMALLEST[kind.name])
  assert topology.chip == kind and topology.num_devices == 4 * kind.devices_per_chip
  mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((64, 1024, 1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # 128 GiB
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as e:
    jax.jit(lambda x: x * 2).lower(x).compile()
  needed, available = aot.parse_oom(str(e.value))
  assert available == kind.usable_bytes and needed == 256 * aot.GIB  # argument + output


@pytest.mark.parametrize("message, expected", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.84G) "
     "exceeds available HBM (15.75G).", (20.84, 15.75)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.51G of "
     "15.48G hbm. Exceeded hbm capacity by 5.03G.", (20.51, 15.48)),
])
def test_parse_oom(message, expected):
  assert aot.parse_oom(message) == tuple(int(v * aot.GIB) for v in expected)
  assert aot.parse_oom("INTERNAL: something else") == (None, None)


def test_model_flops_keep_the_recorded_bench_figure():
  """experiments/README.md records 181.4 TFLOP for the Llama-3.2-1B 8 x 2048 MOPD step."""
  cfg = get_preset("llama-3.2-1b")
  shape = flops.TrainShape(rows=8, prompt=512, teacher_prompt=1024, response=1536)
  assert flops.train_step_flops(cfg, shape).model / 1e12 == pytest.approx(181.4, abs=0.05)
  trust_region = dataclasses.replace(methods.get("mopd"), teacher=methods.TeacherConfig("trust_region"))
  tr = flops.train_step_flops(cfg, shape, StepConfig(method=trust_region))
  ema = flops.train_step_flops(cfg, shape)
  assert tr.teacher == pytest.approx(2 * ema.teacher) and tr.student == ema.student
  assert flops.train_step_flops(cfg, shape, StepConfig(method=methods.get("verified_sft"))).teacher == 0.0
  # The reference model runs on the student rows only (DPO; GRPO with its KL).
  dpo = flops.train_step_flops(cfg, shape, StepConfig(method=methods.get("dpo")))
  assert dpo.teacher == pytest.approx(dpo.student / 3)


def test_several_hosts_sample_in_one_program_over_a_sharded_model():
  c = _tiny(mesh=(1, 4, 2))  # fsdp spans the two hosts
  c.data.prompts_per_step = 8  # 4 per host
  report = aot.compile_all(c, _topology("v5p:2x2x2"), programs=("sample",))
  assert report.num_hosts == 2 and [p.name for p in report.programs] == ["sample_prefill", "sample_decode"]
  for p in report.programs:
    assert p.fits and p.devices == 8 and p.model_flops_per_device == pytest.approx(p.model_flops / 8)
  assert report.programs[1].shapes == "32 rows, one token per step (16 in all) over a cache of 80 slots"


def test_plan_models_follow_the_config_switches():
  c = _tiny()
  c.model.remat, c.model.attention_chunk, c.model.dtype = True, 32, "bfloat16"
  c.model.remat_policy, c.model.scan_layers = "dots_saveable", False
  c.teacher.mode, c.teacher.external_preset, c.method = "external", "tiny-qwen3", "plain_opd"
  plan = aot.make_plan(c, _topology())
  assert plan.student.remat and plan.student.attention_chunk == 32 and plan.student.dtype == "bfloat16"
  assert plan.student.remat_policy == "dots_saveable" and not plan.student.scan_layers
  assert plan.student == model_loading.preset_model_config("tiny-llama", "float32", **model_loading.compute_options(c.model))
  assert plan.teacher.family == "qwen3" and not plan.teacher.remat  # never differentiated
  assert plan.teacher.attention_chunk == 32 and plan.step.method.teacher.mode == "external"


def test_the_decode_step_is_sized_even_when_the_prefill_does_not_fit():
  """Its inputs are shapes from the prefill, not the prefill's compiled program."""
  c = _tiny(mesh=(-1, 1, 1))
  c.data.prompts_per_step = 4096  # the prefill's cache of 4096 x 4 rows does not fit one v5e chip
  c.data.prompt_buckets = (1024,)
  c.data.teacher_prompt_buckets = (1024,)  # an empty teacher context is the student's prompt
  report = aot.compile_all(c, _topology("v5e:2x2"), programs=("sample",))
  prefill, decode = report.programs
  assert not prefill.fits and not decode.skipped
  assert decode.live_bytes > 0 and report.exit_code == 1


def test_prompts_per_step_is_the_whole_run_s_and_must_divide_over_the_hosts():
  c = _tiny(mesh=(-1, 1, 1))
  c.data.prompts_per_step = 8
  assert aot.make_plan(c, _topology("v5p:2x2x2")).rows == 8 * c.sampling.group_size  # not x 2 hosts
  c.data.prompts_per_step, c.mesh.data = 3, 1
  with pytest.raises(config_lib.ConfigError, match=r"config.data.prompts_per_step: 3 prompts per step .* 2 processes"):
    aot.make_plan(c, _topology("v5p:2x2x2"))


@pytest.mark.slow
def test_a_paper_config_fits_its_target_pod_at_reduced_depth():
  """configs/qwen3_8b_lcb.py planned for v5p-64 (mesh, micro-batch, splash from its target),
  every program at the paper's largest shapes and full width, 2 of its 36 layers: a change that
  breaks the sharding plan's fit (or its compilation for the pod) fails here."""
  import importlib
  config = importlib.import_module("configs.qwen3_8b_lcb").get_config("target=v5p-64")
  topology = _topology(aot.target_topology(config, None))
  assert topology.name == "v5p:4x4x4" and topology.num_devices == 64
  report = aot.compile_all(config, topology, num_layers=2)
  assert report.model == "qwen3-8b at 2 layers" and report.mesh == {"data": 1, "fsdp": 32, "tensor": 2}
  assert [p.name for p in report.programs] == PROGRAMS and report.exit_code == 0
  for p in report.programs:
    # all 36 layers: 26.9 GiB of 95.74 for the train step (experiments/README.md, "TPU")
    assert p.fits and p.live_bytes < 0.5 * p.hbm_bytes, p
  assert report.programs[0].shapes.endswith("micro-batches of 128 rows")
