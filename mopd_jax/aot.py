"""Compile the run's programs for a TPU topology from a CPU host: do they fit, how big are they.

    python -m mopd_jax.aot --config=configs/default.py --topology=v5p:2x2x1 --config.mesh.data=-1
    python -m mopd_jax.aot --config=configs/tiny.py --topology=v5e:2x2 --config.mesh.fsdp=2 \\
        --config.mesh.tensor=2 --config.model.attention_impl=splash --json=aot.json
    python -m mopd_jax.aot --config=configs/qwen3_8b_lcb.py                  # its target: v5p-64
    python -m mopd_jax.aot --config=configs/qwen3_14b_to_4b.py:target=v6e-64 --programs=train

No TPU, no weights, no data: the model comes from `config.model.preset` as abstract shapes,
the mesh from `config.mesh` over the topology's devices, and XLA's TPU compiler (libtpu,
`pip install "jax[tpu]"`) compiles each program for that topology. A program that compiles
fits the chip's HBM: the compiler itself refuses one that does not. The run itself takes the
architecture from `model.checkpoint` when it has one (the preset must name the same model),
and a random-init run widens the vocabulary to its tokenizer's, which the tool does not read.

Topologies: `<generation>:<chips along each axis>`, as libtpu names them:
  v4:2x2x1  v4:2x2x2  v4:4x4x4   TPU v4,  32 GiB per chip, two devices per chip (one per
                                 TensorCore, 15.25 GiB usable each): v4:2x2x1 has 8 devices
  v5e:2x2   v5e:2x4   v5e:4x4    TPU v5 lite, 16 GiB per chip (15.75 GiB usable)
  v5p:2x2x1 v5p:2x2x2 v5p:4x4x4  TPU v5,  95 GiB per chip (95.74 GiB usable)
  v6e:2x2   v6e:2x4   v6e:4x4    TPU v6 lite, 32 GiB per chip (31.25 GiB usable)
The smallest topology is one host of 2x2 chips. Compile-only topologies have 4 chips per
host, so v5p:4x4x4 is 64 chips on 16 hosts. A topology of several hosts is compiled as the
trainer runs it there: one process per host (`config.distributed` is taken from the topology),
`data.prompts_per_step` prompts per step in all (each process samples its share), the train
step, the sampler and the scorer each one program over the whole mesh. `config.mesh` must use every
device of the topology (-1 in one axis: the rest).

Programs (`--programs`, default all), at the largest shapes the run reaches:
  train   the train step (`train_step.make_train_step` with `jit_train_step`'s shardings,
          the optimizer, the teacher per `teacher.mode`): prompts_per_step x group_size rows
          of [largest prompt bucket | response] for the student and [largest
          teacher prompt bucket | response] for the teacher. response = the response bucket
          that holds `sampling.max_new_tokens`: responses never outgrow it.
  sample  the sampler's prefill (a process's prompts at the largest prompt bucket, a
          cache of prompt + generation bucket slots, repeated to G rows each) and one decode
          step (`sampling.decode_step`, the body of the decode loop, on the loop's carry: the
          cache and token buffers, donated as the loop updates them in place): the decode
          loop runs it once per generated token, so its memory and FLOPs are the decode's.
  score   the teacher's forward over [teacher prompt | response] rows as the train step runs
          it, no gradient (distillation methods only).
Evaluation sampling (`config.eval`) is not compiled.

Reading the table (all sizes per device, i.e. per chip; per TensorCore on v4):
  args / outs  the program's inputs and outputs; aliased: outputs written into donated inputs
               (the train step's states, the decode step's cache and buffers) and counted once.
  temps        the compiler's temporaries (activations, gradients, scratch).
  live         args + outs - aliased + temps: what the program holds at once; it must stay
               under the HBM column (the compiler also places its code, the "code" column).
  model FLOPs  mopd_jax.flops: the matmul work of one call (whole mesh; per device = / devices);
               XLA is `cost_analysis()["flops"]` per device. XLA counts a loop body once
               (scanned layers, the loss's chunks) and Pallas kernels (splash attention) not
               at all: compare with care.

`model.attention_impl=splash` is compiled as the TPU kernel (not the CPU interpreter).
Exit status: 0 every program fits; 1 one does not ("train_step: needs X GiB per chip, TPU v5
lite has Y GiB"); 2 bad input (unknown topology, a mesh that does not match it, a config error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

PROGRAMS: tuple[str, ...] = ("train", "sample", "score")
GIB = 1024 ** 3
TOPOLOGY_EXAMPLES = "v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v6e:2x2"


class AotError(ValueError):
  """Bad input to the tool (exit status 2)."""


# ----------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class ChipKind:
  """A TPU generation as the compile-only topology presents it."""

  device_kind: str  # jax Device.device_kind
  name: str  # the topology's prefix
  chip_hbm_gib: float  # HBM per chip
  usable_gib: float  # per device, as the compiler reports it ("exceeds available HBM (...)")
  devices_per_chip: int

  @property
  def usable_bytes(self) -> int:
    return int(self.usable_gib * GIB)

  @property
  def unit(self) -> str:
    return "chip" if self.devices_per_chip == 1 else "TensorCore"


# usable_gib: read from RESOURCE_EXHAUSTED errors of an oversized program on each kind
# (libtpu 0.0.42.1): tests/test_aot.py checks them.
CHIP_KINDS: tuple[ChipKind, ...] = (
    ChipKind("TPU v4", "v4", 32.0, 15.25, 2),
    ChipKind("TPU v5 lite", "v5e", 16.0, 15.75, 1),
    ChipKind("TPU v5", "v5p", 95.0, 95.74, 1),
    ChipKind("TPU v6 lite", "v6e", 32.0, 31.25, 1),
)


def chip_kind(device_kind: str) -> Optional[ChipKind]:
  return next((k for k in CHIP_KINDS if k.device_kind == device_kind), None)


# ----------------------------------------------------------------------------- topology


def quiet_libtpu_environment() -> None:
  """Environment for loading libtpu on a host without TPUs (call before it loads).

  Off a TPU VM libtpu looks for the accelerator type and worker hostnames and prints
  warnings and an INVALID_ARGUMENT log when it finds neither; it reads them only to start a
  TPU runtime, which compile-only topologies never do (compiled programs are identical with
  and without these). It also holds /tmp/libtpu_lockfile for the life of the process, so a
  second process (a parallel test run, the CLI under a test) fails with "Internal error when
  accessing libtpu multi-process lockfile": with no TPU to guard, the lock is skipped. On a
  TPU VM nothing of this is set. The CPU backend stays the default either way.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: tuple[Any, ...]  # compile-only jax devices
  device_kind: str
  num_hosts: int
  chip: Optional[ChipKind]  # None: a generation without an HBM entry (the compiler still checks)

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def get_topology(name: str) -> Topology:
  """The compile-only devices of a TPU topology such as "v5p:2x2x1"."""
  quiet_libtpu_environment()
  import jax
  from jax.experimental import topologies

  if not re.fullmatch(r"[A-Za-z0-9_]+:[0-9]+(x[0-9]+)*", name or ""):
    raise AotError(f"--topology={name!r}: expected <generation>:<chips per axis>, e.g. {TOPOLOGY_EXAMPLES}")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except RuntimeError as e:  # JaxRuntimeError from libtpu; RuntimeError without libtpu
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "not installed" in first:
      hint = f'; install libtpu: pip install "jax[tpu]=={jax.__version__}"'
    elif "lockfile" in first:
      hint = "; another process has libtpu loaded (where no TPU is attached, ALLOW_MULTIPLE_LIBTPU_LOAD=1 allows it)"
    else:
      hint = f"; examples: {TOPOLOGY_EXAMPLES}"
    raise AotError(f"--topology={name!r}: {first}{hint}") from None
  devices = tuple(desc.devices)
  kind = devices[0].device_kind
  return Topology(name=name, devices=devices, device_kind=kind,
                  num_hosts=len({d.process_index for d in devices}), chip=chip_kind(kind))


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """What gets compiled: the validated config, models, mesh and the largest shapes."""

  config: Any  # a validated copy of the config (ml_collections.ConfigDict)
  topology: Topology
  mesh: Any  # jax.sharding.Mesh over every device of the topology
  processes: int  # one per host
  student: Any  # ModelConfig
  teacher: Any  # ModelConfig of the external teacher, or None
  step: Any  # train_step.StepConfig
  sampling: Any  # sampling.SamplingParams of the training rollouts
  rows: int  # train-step rows (global)
  prompt_len: int  # largest prompt bucket
  teacher_prompt_len: int
  response_len: int  # the bucket that holds sampling.max_new_tokens
  sample_prompts: int  # prompts per sampler call, all processes together (one program over the mesh)
  context_slots: int  # K distinct teacher contexts per group; G (each rollout its own) is the worst case


def _mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  shape = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  if -1 in shape:
    fixed = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = num_devices // fixed
  return tuple(shape)


def _aot_config(config, processes: int):
  """A copy to validate: the topology's processes, and no data file to find.

  The tool reads no data and no weights, and the data may live only where the run will
  happen: `data.path` becomes os.devnull, a path that exists, so `validate` skips its data
  checks (a file task's path is still needed by the run itself). Checkpoints are not checked
  by `validate`; the model comes from `model.preset`.
  """
  c = config.copy_and_resolve_references()
  c.data.path = os.devnull
  c.distributed.enabled = processes > 1
  c.distributed.num_processes = processes
  return c


@contextlib.contextmanager
def _config_error(field: str):
  """ValueErrors of the library's own checks, as config errors naming the field."""
  from mopd_jax import config_lib

  try:
    yield
  except config_lib.ConfigError:
    raise
  except ValueError as e:
    raise config_lib.ConfigError(f"{field}: {e}") from None


def make_plan(config, topology: Topology, num_layers: int = 0, context_slots: int = 0):
  """Validate `config` for `topology` and fix the shapes (raises ConfigError / AotError).

  num_layers > 0: every model at that depth, full width (a quick check of a sharding plan: the
  scanned layers make the per-layer program the same, and the memory per layer adds up).
  context_slots > 0: K distinct teacher contexts per group (`batching.context_slots`; below G
  the step encodes each once, `teacher.share_contexts`); 0: K = G, every rollout its own.
  """
  from mopd_jax import batching, config_lib, rollouts, sharding, trainer
  from mopd_jax.weights import loading as model_loading

  processes = topology.num_hosts
  c = _aot_config(config, processes)
  n = topology.num_devices
  config_lib.validate(c, num_devices=n, platform="tpu")
  shape = _mesh_shape(c.mesh, n)
  if math.prod(shape) != n:
    raise config_lib.ConfigError(
        f"config.mesh: data x fsdp x tensor = {' x '.join(map(str, shape))} = {math.prod(shape)} devices, but "
        f"topology {topology.name} has {n} ({topology.device_kind}); use them all (-1 in one axis: the rest)")
  mesh = sharding.make_mesh(sharding.MeshConfig(*shape), devices=topology.devices)
  m = c.model
  with _config_error("config.model"):
    student = model_loading.preset_model_config(m.preset, m.param_dtype, **model_loading.compute_options(m))
  teacher = None
  if c.teacher.mode == "external":
    with _config_error("config.teacher.external_preset"):
      teacher = model_loading.preset_model_config(
          c.teacher.external_preset, m.param_dtype, **model_loading.compute_options(m, backward=False))
  if num_layers:
    student = student.replace(num_layers=num_layers)
    teacher = None if teacher is None else teacher.replace(num_layers=num_layers)
  d = c.data
  with _config_error("config.sampling"):
    sampling_params = rollouts.sampling_params(
        c, temperature=c.sampling.temperature, max_new_tokens=c.sampling.max_new_tokens)
    response = batching.bucket_for(c.sampling.max_new_tokens, d.response_buckets, "max_new_tokens")
  g = c.sampling.group_size
  multiple = trainer.context_slot_multiple(c, mesh)
  if context_slots and not (context_slots <= g and context_slots % multiple == 0):
    raise AotError(f"--context_slots={context_slots}: must be at most sampling.group_size={g} and a multiple of "
                   f"{multiple} (each micro-batch's context table divides over the batch shards)")
  return Plan(
      config=c, topology=topology, mesh=mesh, processes=processes, student=student, teacher=teacher,
      step=trainer.step_config(c), sampling=sampling_params, rows=d.prompts_per_step * g,
      prompt_len=max(d.prompt_buckets), teacher_prompt_len=max(d.teacher_prompt_buckets or d.prompt_buckets),
      response_len=response, sample_prompts=trainer.prompts_per_process(c, processes) * processes,
      context_slots=context_slots or g)


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """One compiled program, per device unless named otherwise."""

  name: str
  shapes: str
  devices: int  # devices the program runs on
  fits: bool
  compile_s: float
  hbm_bytes: Optional[int]  # usable per device (table, or the compiler's figure)
  live_bytes: Optional[int]  # args + outs - aliased + temps; the compiler's requirement if it does not fit
  argument_bytes: Optional[int] = None
  output_bytes: Optional[int] = None
  alias_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None
  code_bytes: Optional[int] = None
  model_flops: float = 0.0  # one call, whole program (all its devices)
  model_flops_per_device: float = 0.0
  xla_flops_per_device: Optional[float] = None
  mosaic_kernels: int = 0  # compiled Pallas TPU kernel calls (splash attention), not interpreted
  skipped: str = ""  # why it was not compiled
  error: str = ""  # the compiler's message when it does not fit


@dataclasses.dataclass(frozen=True)
class AotReport:
  topology: str
  device_kind: str
  num_devices: int
  num_hosts: int
  hbm_bytes_per_device: Optional[int]
  mesh: dict[str, int]
  model: str
  method: str
  teacher_mode: str
  attention_impl: str
  dtype: str
  param_dtype: str
  programs: tuple[ProgramReport, ...]

  @property
  def all_fit(self) -> bool:
    return all(p.fits for p in self.programs)

  @property
  def exit_code(self) -> int:
    return 0 if self.all_fit else 1

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}
_SIZE = r"([0-9.]+)\s*([KMGTP]?)i?B?"
_OOM_PATTERNS = (
    re.compile(rf"required for .*?\({_SIZE}\) exceeds available HBM \({_SIZE}\)", re.S),
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
)


def parse_oom(message: str) -> tuple[Optional[int], Optional[int]]:
  """(needed, available) bytes from XLA:TPU's RESOURCE_EXHAUSTED message (binary units)."""
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      need = float(m.group(1)) * _UNITS[m.group(2)]
      have = float(m.group(3)) * _UNITS[m.group(4)]
      return int(need), int(have)
  return None, None


def fmt_bytes(n: Optional[float]) -> str:
  if n is None:
    return "-"
  for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def fmt_flops(n: Optional[float]) -> str:
  if n is None:
    return "-"
  for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n:.3g}"


# ----------------------------------------------------------------------------- compiling


def lowering_for_tpu(attention_impls: Sequence[str]) -> contextlib.AbstractContextManager:
  """Trace and lower as for a TPU run: splash attention as the compiled Pallas kernel, not
  the interpreter that a CPU process would otherwise pick."""
  if "splash" not in attention_impls:
    return contextlib.nullcontext()
  from mopd_jax.models import splash
  return splash.compiling_for_tpu()


def _xla_flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _mosaic_kernels(compiled) -> int:
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def compile_program(name: str, shapes: str, lower: Callable[[], Any], *, devices: int, topology: Topology,
                    model_flops: float, context: Callable[[], Any]) -> tuple[ProgramReport, Any]:
  """Lower and compile; a program that does not fit becomes a report, not an exception.
  Returns (report, compiled or None)."""
  import jax

  hbm = topology.chip.usable_bytes if topology.chip else None
  common = dict(name=name, shapes=shapes, devices=devices, model_flops=model_flops,
                model_flops_per_device=model_flops / devices)
  start = time.perf_counter()
  try:
    with context():
      compiled = lower().compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    needed, available = parse_oom(message)
    return ProgramReport(
        fits=False, compile_s=time.perf_counter() - start, hbm_bytes=available or hbm, live_bytes=needed,
        error=message.strip().splitlines()[0][:400], **common), None
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  sizes = dict(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
               code_bytes=mem.generated_code_size_in_bytes)
  live = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
  fits = hbm is None or live <= hbm
  return ProgramReport(fits=fits, compile_s=compile_s, hbm_bytes=hbm, live_bytes=live,
                       xla_flops_per_device=_xla_flops(compiled), mosaic_kernels=_mosaic_kernels(compiled),
                       **sizes, **common), compiled


def _skipped(name: str, shapes: str, why: str, devices: int, topology: Topology) -> ProgramReport:
  return ProgramReport(name=name, shapes=shapes, devices=devices, fits=True, compile_s=0.0,
                       hbm_bytes=topology.chip.usable_bytes if topology.chip else None, live_bytes=None,
                       skipped=why)


def _with_shardings(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_batch(rows: int, prompt_len: int, teacher_prompt_len: int, response_len: int, mesh,
                         group_size: int, context_slots: int):
  """A TrainBatch of ShapeDtypeStructs, rows over data x fsdp. Widths and dtypes come from one
  group through the host batching (`batching.build_train_batch`), so they follow it; its G
  rollouts have `context_slots` distinct teacher contexts (K = G: the most a step can hold)."""
  import jax
  import numpy as np

  from mopd_jax import batching, sharding

  g, k = group_size, context_slots
  one_group = batching.build_train_batch(
      batching.RolloutRows(student_prompts=[[1]] * g, teacher_prompts=[[1, i % k] for i in range(g)],
                           responses=[[1]] * g, sampler_logprobs=[[0.0]] * g, distill_mask=[1.0] * g,
                           rewards=[1.0] * g, success=[True] * g, group_ids=[0] * g),
      pad_id=0, prompt_buckets=(prompt_len,), teacher_prompt_buckets=(teacher_prompt_len,),
      response_buckets=(response_len,))
  def scaled(x, leading: int):  # one group's G rows (or K contexts) -> the step's
    return jax.ShapeDtypeStruct((leading,) + np.shape(x)[1:], np.asarray(x).dtype,
                                sharding=sharding.batch_sharding(mesh, np.ndim(x)))

  batch = jax.tree.map(lambda x: scaled(x, rows), one_group)
  contexts = rows // g * k
  return batch.replace(teacher_contexts=scaled(one_group.teacher_contexts, contexts),
                       teacher_context_segments=scaled(one_group.teacher_context_segments, contexts))


@dataclasses.dataclass(frozen=True)
class _States:
  graphdef: Any
  teacher_graphdef: Any
  optimizer: Any
  lr_fn: Any
  state: Any  # abstract TrainState
  teacher: Any  # abstract TeacherState


def _abstract_states(plan: Plan) -> _States:
  import jax
  from flax import nnx

  from mopd_jax import sharding, trainer
  from mopd_jax.models import abstract_model
  from mopd_jax.train_step import init_teacher_state, init_train_state

  graphdef, params = nnx.split(abstract_model(plan.student), nnx.Param)
  teacher_graphdef, external = None, None
  if plan.teacher is not None:
    teacher_graphdef, external = nnx.split(abstract_model(plan.teacher), nnx.Param)
  with _config_error("config.mesh"):  # a mesh axis that does not divide a parameter, named
    for p in (params, external):
      if p is not None:
        sharding.param_shardings(p, plan.mesh)
  optimizer, lr_fn = trainer.optimizer_from_config(plan.config)
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer), params)
  teacher = jax.eval_shape(lambda p, e: init_teacher_state(plan.step, p, e), params, external)
  return _States(graphdef, teacher_graphdef, optimizer, lr_fn, state, teacher)


def _impls(plan: Plan) -> tuple[str, ...]:
  return tuple(m.attention_impl for m in (plan.student, plan.teacher) if m is not None)


def _train_shape(plan: Plan):
  from mopd_jax.flops import TrainShape
  return TrainShape(rows=plan.rows, prompt=plan.prompt_len, teacher_prompt=plan.teacher_prompt_len,
                    response=plan.response_len)


def _train_shapes_text(plan: Plan) -> str:
  micro = plan.step.micro_batch_rows
  return (f"{plan.rows} rows: student {plan.prompt_len}+{plan.response_len}, "
          f"teacher {plan.teacher_prompt_len}+{plan.response_len}" + _contexts_text(plan)
          + (f", micro-batches of {micro} rows" if micro and micro < plan.rows else ""))


def _contexts_text(plan: Plan) -> str:
  g, k = plan.step.group_size, plan.context_slots
  return "" if k == g else f" ({k} of {g} teacher contexts distinct per group, each encoded once)"


def compile_train_step(plan: Plan, states: _States) -> ProgramReport:
  import jax

  from mopd_jax import flops, sharding
  from mopd_jax.train_step import jit_train_step, make_train_step

  step_fn = make_train_step(states.graphdef, states.optimizer, plan.step, teacher_graphdef=states.teacher_graphdef,
                            learning_rate_fn=states.lr_fn, mesh=plan.mesh)
  run = jit_train_step(step_fn, plan.mesh, states.state, states.teacher, states.optimizer)
  batch = abstract_train_batch(plan.rows, plan.prompt_len, plan.teacher_prompt_len, plan.response_len, plan.mesh,
                               plan.step.group_size, plan.context_slots)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(plan.mesh))
  model_flops = flops.train_step_flops(plan.student, _train_shape(plan), plan.step, plan.teacher).model
  report, _ = compile_program(
      "train_step", _train_shapes_text(plan), lambda: run.jitted.lower(states.state, states.teacher, batch, rng),
      devices=plan.topology.num_devices, topology=plan.topology, model_flops=model_flops,
      context=lambda: lowering_for_tpu(_impls(plan)))
  return report


def compile_teacher_score(plan: Plan, states: _States) -> ProgramReport:
  import jax

  from mopd_jax import flops, sharding
  from mopd_jax.train_step import teacher_hidden

  shapes = f"{plan.rows} rows: teacher {plan.teacher_prompt_len}+{plan.response_len}" + _contexts_text(plan)
  if not plan.step.method.teacher_context_forwards:
    return _skipped("teacher_score", shapes, f"method {plan.config.method!r} has no teacher-context forward",
                    plan.topology.num_devices, plan.topology)
  mesh = plan.mesh
  # The student's params are an input only where the teacher uses them (trust region).
  student = states.state.params if plan.step.method.teacher_context_forwards == 2 else None
  student_sh = None if student is None else sharding.param_shardings(student, mesh)
  teacher_sh = sharding.param_shardings(states.teacher.params, mesh)
  batch = abstract_train_batch(plan.rows, plan.prompt_len, plan.teacher_prompt_len, plan.response_len, mesh,
                               plan.step.group_size, plan.context_slots)

  def score(student_params, teacher, batch):
    with sharding.activation_mesh(mesh):  # as the train step traces its models
      return teacher_hidden(plan.step, states.graphdef, states.teacher_graphdef, student_params, teacher, batch)

  score = jax.jit(score, in_shardings=(student_sh, type(states.teacher)(params=teacher_sh), None))
  t_len = plan.teacher_prompt_len + plan.response_len
  model_flops = flops.teacher_score_flops(plan.student, plan.rows, t_len, plan.step, plan.teacher)
  report, _ = compile_program(
      "teacher_score", shapes, lambda: score.lower(student, states.teacher, batch),
      devices=plan.topology.num_devices, topology=plan.topology, model_flops=model_flops,
      context=lambda: lowering_for_tpu(_impls(plan)))
  return report


def _decode_state_shardings(s, mesh, rows_sharding: Callable[[int], Any], repl, num_kv_heads: int):
  """The sampler's shardings for a DecodeState (or Prefilled): rows over data x fsdp, the stacked cache by
  `sharding.cache_sharding`, scalars replicated (off the mesh: all on `repl`, one chip)."""
  import jax

  from mopd_jax import sharding

  shardings = jax.tree.map(lambda x: repl if x.ndim == 0 else rows_sharding(x.ndim), s)
  if mesh is not None:
    kv = sharding.cache_sharding(mesh, num_kv_heads)
    shardings = shardings.replace(cache=shardings.cache.replace(keys=kv, values=kv))
  return shardings


def compile_sampler(plan: Plan, states: _States) -> tuple[ProgramReport, ProgramReport]:
  """The prefill and one decode step, as `sampling.sample` calls them in the trainer."""
  import jax
  import numpy as np

  from mopd_jax import flops, sampling, sharding

  sp = plan.sampling
  g = plan.config.sampling.group_size
  b, lp = plan.sample_prompts, plan.prompt_len
  gen_len = plan.response_len  # the generation buckets are the response buckets
  rows = b * g
  # One SPMD program over the whole mesh, every process feeding its own prompts; the params in
  # the sampler's layout (`sampling.param_layout`, as the trainer's `Run.sampler_params`).
  mesh, devices = plan.mesh, plan.topology.num_devices
  rows_sharding = lambda ndim: sharding.batch_sharding(mesh, ndim)
  repl = sharding.replicated(mesh)
  rules = sharding.sampling_rules(plan.config.sampling.param_layout)
  params = _with_shardings(states.state.params, sharding.param_shardings(states.state.params, mesh, rules))
  context = lambda: lowering_for_tpu(_impls(plan))
  tokens = jax.ShapeDtypeStruct((b, lp), np.int32, sharding=rows_sharding(2))
  lengths = jax.ShapeDtypeStruct((b,), np.int32, sharding=rows_sharding(1))
  prefill_shapes = f"{b} prompts x {lp} tokens, cache {lp}+{gen_len} slots, x{g} rows"
  prefill, compiled = compile_program(
      "sample_prefill", prefill_shapes,
      lambda: sampling._prefill.lower(states.graphdef, params, tokens, lengths, num_samples=g,
                                      generation_len=gen_len, mesh=mesh),
      devices=devices, topology=plan.topology, model_flops=flops.prefill_flops(plan.student, b, lp),
      context=context)
  decode_shapes = f"{rows} rows, one token per step ({gen_len} in all) over a cache of {lp + gen_len} slots"
  step_flops = flops.decode_step_flops(plan.student, rows, lp + gen_len)
  # One step's inputs: the prefill's outputs as they come out of it, the decode loop's carry
  # built from them as `sampling._decode` builds it (shapes only), with the sampler's shardings.
  if compiled is not None:
    out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), compiled.out_info)
  else:  # the prefill does not fit; the decode step is still sized, from the prefill's shapes
    out = jax.eval_shape(lambda p, t, l: sampling._prefill(states.graphdef, p, t, l, num_samples=g,
                                                           generation_len=gen_len, mesh=mesh), params, tokens, lengths)
    out = _with_shardings(out, _decode_state_shardings(out, mesh, rows_sharding, repl, plan.student.num_kv_heads))
  rule = sp.token_rule()
  limits = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=repl),
                        sampling.limits(sp))
  key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
  keys = jax.ShapeDtypeStruct((rows,), key_dtype, sharding=rows_sharding(1))  # sampling.row_keys
  initial = lambda cache, logits, keys, limits: sampling.initial_decode_state(
      cache, logits, keys, limits, rule=rule, generation_len=gen_len, mesh=mesh)
  carry = jax.eval_shape(initial, out.cache, out.logits, keys, limits)
  carry = _with_shardings(carry, _decode_state_shardings(carry, mesh, rows_sharding, repl, plan.student.num_kv_heads))
  # The carry donated as the loop updates it in place; keep_unused: the loop carries every field,
  # also those the step overwrites without reading (`Decoded.steps`), so all of it is aliased.
  step = jax.jit(sampling.decode_step, static_argnames=("graphdef", "rule", "mesh"), donate_argnames=("s",),
                 keep_unused=True)
  decode, _ = compile_program(
      "sample_decode", decode_shapes,
      lambda: step.lower(states.graphdef, params, carry, out.positions, keys, limits, rule=rule, mesh=mesh),
      devices=devices, topology=plan.topology, model_flops=step_flops, context=context)
  return prefill, decode


def compile_all(config, topology: Topology, programs: Sequence[str] = PROGRAMS,
                progress: Callable[[str], None] = lambda line: None, num_layers: int = 0,
                context_slots: int = 0) -> AotReport:
  """Validate, then compile the chosen programs for `topology` (see the module docstring)."""
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise AotError(f"--programs: unknown {unknown}; known: {', '.join(PROGRAMS)}")
  plan = make_plan(config, topology, num_layers, context_slots)
  states = _abstract_states(plan)
  unit = topology.chip.unit if topology.chip else "device"
  reports: list[ProgramReport] = []

  def run(label: str, what: str, fn: Callable[[], Any]) -> None:
    progress(f"[aot] {label}: compiling {what} for {topology.name} ...")
    out = fn()
    for r in (out if isinstance(out, tuple) else (out,)):
      reports.append(r)
      progress(f"[aot] {r.name}: {_verdict(r, topology, unit)}")

  if "train" in programs:
    run("train_step", _train_shapes_text(plan), lambda: compile_train_step(plan, states))
  if "sample" in programs:
    run("sampler", f"prefill + decode step, {plan.sample_prompts} prompts x {plan.config.sampling.group_size}",
        lambda: compile_sampler(plan, states))
  if "score" in programs:
    run("teacher_score", f"{plan.rows} teacher rows", lambda: compile_teacher_score(plan, states))
  c = plan.config
  model = c.model.preset + (f" at {plan.student.num_layers} layers" if num_layers else "")
  return AotReport(
      topology=topology.name, device_kind=topology.device_kind, num_devices=topology.num_devices,
      num_hosts=topology.num_hosts, hbm_bytes_per_device=topology.chip.usable_bytes if topology.chip else None,
      mesh=dict(plan.mesh.shape), model=model, method=c.method, teacher_mode=c.teacher.mode,
      attention_impl=c.model.attention_impl, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
      programs=tuple(reports))


def _verdict(r: ProgramReport, topology: Topology, unit: str) -> str:
  if r.skipped:
    return f"skipped ({r.skipped})"
  if not r.fits:
    return (f"needs {fmt_bytes(r.live_bytes)} per {unit}, {topology.device_kind} has {fmt_bytes(r.hbm_bytes)}"
            f" (does not fit; compiler: {r.error})")
  kernels = f", {r.mosaic_kernels} Pallas kernel call(s)" if r.mosaic_kernels else ""
  return (f"fits, live {fmt_bytes(r.live_bytes)} of {fmt_bytes(r.hbm_bytes)} per {unit}, compiled in "
          f"{r.compile_s:.1f} s{kernels}")


def format_table(report: AotReport) -> str:
  head = ("program", "args", "outs", "aliased", "temps", "live", "HBM", "fits", "code", "compile",
          "model FLOPs", "per device", "XLA per dev")
  rows = [head]
  for r in report.programs:
    if r.skipped:
      rows.append((r.name, "skipped") + ("",) * (len(head) - 2))
      continue
    rows.append((
        r.name, fmt_bytes(r.argument_bytes), fmt_bytes(r.output_bytes), fmt_bytes(r.alias_bytes),
        fmt_bytes(r.temp_bytes), fmt_bytes(r.live_bytes), fmt_bytes(r.hbm_bytes), "yes" if r.fits else "NO",
        fmt_bytes(r.code_bytes), f"{r.compile_s:.1f} s", fmt_flops(r.model_flops),
        fmt_flops(r.model_flops_per_device), fmt_flops(r.xla_flops_per_device)))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
           for row in rows]
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
  title = (f"{report.model} ({report.param_dtype} params, {report.dtype} compute, attention {report.attention_impl}), "
           f"method {report.method} (teacher {report.teacher_mode}) on {report.topology}: {report.num_devices} x "
           f"{report.device_kind}, {report.num_hosts} host(s), mesh {mesh}")
  notes = [f"  {r.name}: {r.shapes}" for r in report.programs]
  return "\n".join([title, *lines, "shapes:", *notes])


# ----------------------------------------------------------------------------- CLI


def target_topology(config, topology_name: Optional[str]) -> str:
  """--topology, or the topology the config is planned for (`config.tpu.topology`, the paper
  configs' targets)."""
  if topology_name:
    return topology_name
  planned = config.get("tpu", {}).get("topology") if hasattr(config, "get") else None
  if not planned:
    raise AotError(f"--topology is required (the config names no target topology); e.g. {TOPOLOGY_EXAMPLES}")
  return planned


def _main(config, topology_name: Optional[str], programs: Sequence[str], json_path: Optional[str],
          num_layers: int = 0, context_slots: int = 0) -> int:
  from mopd_jax import config_lib
  from mopd_jax.logging_lib import quiet_library_logs

  quiet_library_logs()
  try:
    topology = get_topology(target_topology(config, topology_name))
    report = compile_all(config, topology, programs, progress=lambda line: print(line, flush=True),
                         num_layers=num_layers, context_slots=context_slots)
  except (AotError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(report))
  for r in report.programs:
    if not r.fits:
      unit = topology.chip.unit if topology.chip else "device"
      print(f"{r.name}: needs {fmt_bytes(r.live_bytes)} per {unit}, {report.device_kind} has "
            f"{fmt_bytes(r.hbm_bytes)}", file=sys.stderr)
  if json_path:
    with open(json_path, "w") as f:
      f.write(report.to_json())
    print(f"wrote {json_path}")
  return report.exit_code


def run(argv: Optional[Sequence[str]] = None) -> None:
  quiet_libtpu_environment()  # before jax picks backends or loads libtpu
  from absl import app, flags
  from ml_collections import config_flags

  import configs

  default = os.path.join(os.path.dirname(configs.__file__), "default.py")
  config = config_flags.DEFINE_config_file("config", default, "Run configuration (a get_config file).",
                                           lock_config=True)
  topology = flags.DEFINE_string(
      "topology", None, f"TPU topology, e.g. {TOPOLOGY_EXAMPLES}; default: the config's target (config.tpu.topology)")
  programs = flags.DEFINE_list("programs", list(PROGRAMS), f"programs to compile: {', '.join(PROGRAMS)}")
  json_path = flags.DEFINE_string("json", None, "write the report here as JSON")
  layers = flags.DEFINE_integer("num_layers", 0, "> 0: compile the models at this depth, full width (quick plan check)")
  slots = flags.DEFINE_integer(
      "context_slots", 0, "distinct teacher contexts per group K (0: G, every rollout its own: the most memory)")
  app.run(lambda _: sys.exit(_main(config.value, topology.value, programs.value, json_path.value, layers.value,
                                   slots.value)),
          argv=None if argv is None else list(argv))


if __name__ == "__main__":
  run()
