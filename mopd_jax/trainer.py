"""The MOPD host loop: data -> sample G -> verify -> peer contexts -> batch -> step -> log.

Reads top to bottom: `train(config)` builds a `Run` (models, tokenizer, mesh, jitted step,
checkpointer, data) once, optionally restores, then loops `run_one_step`. Everything traced
lives in `train_step.py` and `sampling.py`; this file only wires and does I/O. A prompt's G
rollouts travel as one `rollouts.RolloutGroup` from the sampler to the batch; models load in
`weights/loading.py`, prompts in `tasks/loading.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from mopd_jax import batching, checkpointing, config_lib, methods, peers, rollouts, sharding
from mopd_jax import sampling as sampling_lib
from mopd_jax.logging_lib import MetricsLogger, flatten_metrics
from mopd_jax.passk import aggregate_pass_at_k
from mopd_jax.rollouts import RolloutGroup, TrainingError
from mopd_jax.tasks import loading as task_loading
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.train_step import (
    StepConfig, TeacherState, TrainState, init_teacher_state, init_train_state, jit_train_step, make_optimizer,
    make_train_step)
from mopd_jax.types import Example
from mopd_jax.verifiers.base import VerifierPool, default_pool
from mopd_jax.weights import loading as model_loading


# ----------------------------------------------------------------------------- start-up


def step_config(config) -> StepConfig:
  return StepConfig(method=methods.from_config(config), group_size=config.sampling.group_size,
                    micro_batch_rows=config.train.micro_batch_rows)


# ----------------------------------------------------------------------------- the batch


def build_batch(run: "Run", groups: Sequence[RolloutGroup]) -> batching.TrainBatch:
  """This process's groups as one bucketed batch (`rollouts.batch_rows`, then padding)."""
  token_text = (lambda t: run.tokenizer.decode([t])) if run.config.loss.step_level else None
  rows = rollouts.batch_rows(groups, token_text=token_text)
  d = run.config.data
  at_least = batching.local_max_lengths(rows)
  if jax.process_count() > 1:  # every process must pick the same buckets
    from jax.experimental import multihost_utils
    at_least = tuple(int(x) for x in np.max(multihost_utils.process_allgather(np.asarray(at_least)), axis=0))
  return batching.build_train_batch(
      rows, pad_id=run.tokenizer.pad_id, prompt_buckets=d.prompt_buckets, response_buckets=d.response_buckets,
      teacher_prompt_buckets=d.teacher_prompt_buckets, at_least=at_least,
      context_slot_multiple=context_slot_multiple(run.config, run.mesh))


def context_slot_multiple(config, mesh) -> int:
  """The step's micro-batches hold whole groups; their context tables must divide over the
  batch shards (`batching.context_slot_multiple`). mesh None: one device."""
  rows = config.data.prompts_per_step * config.sampling.group_size
  micro_rows = config.train.micro_batch_rows or rows
  shards = 1 if mesh is None else sharding.num_batch_shards(mesh)
  return batching.context_slot_multiple(micro_rows // config.sampling.group_size, shards)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvalResult:
  mean_at_k: float  # mean success over the k samples of every held-out prompt
  pass_at_k: float
  k: int
  num_prompts: int
  per_item_success: Sequence[Sequence[bool]]


def evaluate(run: "Run", examples: Sequence[Example], rng) -> EvalResult:
  """mean@k and pass@k of the held-out prompts: `rollouts.sample_groups` at `config.eval`'s
  settings, every call under `rng` with the prompts numbered globally."""
  c = run.config.eval
  groups = rollouts.sample_groups(
      run, examples, rng, num_samples=c.num_samples, temperature=c.temperature, top_p=c.top_p,
      max_new_tokens=c.max_new_tokens, batch_prompts=c.batch_prompts, fold_in_start=False)
  successes = [list(g.successes) for g in groups]
  (stats,) = aggregate_pass_at_k(successes, ks=(c.num_samples,))
  return EvalResult(mean_at_k=float(np.mean(successes)), pass_at_k=stats.pass_at_k, k=c.num_samples,
                    num_prompts=len(examples), per_item_success=successes)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  config: Any
  tokenizer: Tokenizer
  mesh: Any
  sample_mesh: Any
  student_graphdef: Any
  sampler_graphdef: Any
  step_fn: Any
  state: TrainState
  teacher: TeacherState
  peer_config: peers.PeerConfig
  verifier_pool: VerifierPool
  train_examples: list
  eval_examples: list
  logger: MetricsLogger
  checkpointer: Optional[checkpointing.RunCheckpointer]
  position: checkpointing.RunPosition
  rng: Any
  prompt_filter: Optional[task_loading.PromptFilter] = None  # what load time dropped (data.max_prompt_len)

  def sampler_params(self):
    # The sampler runs over the same mesh (spanning every process), from the training layout or
    # a jitted on-device reshard of it (`sampling.param_layout`).
    return sampling_lib.reshard_for_sampling(self.state.params, self.mesh, self.config.sampling.param_layout)

  def checkpoint_arrays(self):
    rng = jax.random.key_data(self.rng)
    if rng.is_fully_addressable:
      # A fresh run's key sits on one device (a restored one is replicated over the mesh); orbax
      # saves only global arrays in a multi-process run, so it is saved replicated over the mesh.
      host = np.asarray(rng)
      rng = jax.make_array_from_callback(host.shape, sharding.replicated(self.mesh), lambda index: host[index])
    return {"state": self.state, "teacher": self.teacher, "rng": rng}

  def checkpoint_shardings(self):
    """Where each entry of `checkpoint_arrays()` lives, for restoring it."""
    return {"state": self.step_fn.state_shardings, "teacher": self.step_fn.teacher_shardings,
            "rng": sharding.replicated(self.mesh)}


def optimizer_from_config(config):
  """(optax optimizer, learning-rate schedule) from `config.optim` and `config.train.steps`; the
  peak rate is the method's (`config_lib.learning_rate`: optim.preference_lr for DPO and SimPO)."""
  o = config.optim
  return make_optimizer(
      config_lib.learning_rate(config), warmup_steps=o.warmup_steps, total_steps=config.train.steps,
      schedule=o.schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def setup(config) -> Run:
  if config.distributed.enabled:
    # CPU multi-process runs (tests, laptops) need gloo collectives; ignored on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    d = config.distributed
    if d.coordinator_address:
      jax.distributed.initialize(
          coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    else:  # TPU VMs (and SLURM, ...): JAX finds the coordinator, process count and id itself
      jax.distributed.initialize()
  config_lib.validate(config, num_devices=jax.device_count())
  mesh = sharding.make_mesh(sharding.MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
  m = config.model
  model, tokenizer = model_loading.load_model_and_tokenizer(
      m.preset, m.checkpoint, m.tokenizer, m.param_dtype, seed=config.seed, mesh=mesh,
      **model_loading.compute_options(m))
  graphdef, params = nnx.split(model, nnx.Param)
  params = sharding.shard_params(params, mesh)
  step_cfg = step_config(config)
  teacher_graphdef, external_params = None, None
  if step_cfg.method.external_teacher:
    t_model, t_tok = model_loading.load_model_and_tokenizer(
        config.teacher.external_preset, config.teacher.external_checkpoint, "", m.param_dtype, seed=config.seed,
        mesh=mesh, **model_loading.compute_options(m, backward=False))
    model_loading.check_same_tokenizer(tokenizer, t_tok)
    teacher_graphdef, external_params = nnx.split(t_model, nnx.Param)
    external_params = sharding.shard_params(external_params, mesh)
  optimizer, lr_fn = optimizer_from_config(config)
  state = init_train_state(params, optimizer)
  teacher = init_teacher_state(step_cfg, params, external_params)
  step_fn = jit_train_step(
      make_train_step(graphdef, optimizer, step_cfg, teacher_graphdef=teacher_graphdef, learning_rate_fn=lr_fn,
                      mesh=mesh),
      mesh, state, teacher, optimizer)
  state = jax.device_put(state, step_fn.state_shardings)
  teacher = jax.device_put(teacher, step_fn.teacher_shardings)
  peer_config = config_lib.peer_config(config)
  # Overlong prompts go now, measured as the sampler will see them, not mid-run in the sampler.
  train_examples, eval_examples, prompt_filter = task_loading.filter_prompts(
      config, tokenizer, peer_config, *task_loading.load_examples(config))
  log_dir = config.logging.dir or os.path.join("runs", f"{config.method}-{int(time.time())}")
  logger = MetricsLogger(log_dir, enabled=jax.process_index() == 0, progress=config.logging.progress,
                         total_steps=config.train.steps)
  logger.info(prompt_filter.message())
  checkpointer = None
  if config.checkpoint.dir:
    checkpointer = checkpointing.RunCheckpointer(
        config.checkpoint.dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  run = Run(
      config=config, tokenizer=tokenizer, mesh=mesh, sample_mesh=mesh,
      student_graphdef=graphdef, sampler_graphdef=graphdef, step_fn=step_fn, state=state, teacher=teacher,
      peer_config=peer_config, verifier_pool=default_pool(config.verifier.num_workers),
      train_examples=train_examples, eval_examples=eval_examples, logger=logger, checkpointer=checkpointer,
      position=checkpointing.RunPosition(step=0, data_position=0), rng=jax.random.key(config.seed),
      prompt_filter=prompt_filter)
  if checkpointer is not None and checkpointer.latest_step() is not None:
    try:
      restore(run)
    except BaseException:
      checkpointer.close()  # no orbax threads left behind by a refused checkpoint
      raise
  return run


def restore(run: Run) -> None:
  # Verified against the step's checksums; a damaged step is reported, set aside, and the one
  # before it restored (checkpointing.RunCheckpointer.restore).
  arrays, position = run.checkpointer.restore(run.checkpoint_arrays(), shardings=run.checkpoint_shardings(),
                                              warn=run.logger.warning)
  run.state, run.teacher = arrays["state"], arrays["teacher"]
  run.rng = jax.random.wrap_key_data(arrays["rng"])
  run.position = position
  run.logger.info(f"resumed from step {position.step} ({run.checkpointer.directory})")


def prompts_per_process(config, process_count: int) -> int:
  """This process's share of `data.prompts_per_step`, the prompts of one optimizer step for the
  whole run (validated to divide by the number of processes)."""
  total = config.data.prompts_per_step
  if total % process_count:
    raise config_lib.ConfigError(
        f"config.data.prompts_per_step: {total} prompts per step do not divide over {process_count} processes")
  return total // process_count


def next_prompts(run: Run) -> tuple[list[Example], int]:
  """This process's prompts for the step, and the global index of its first group."""
  per_process = prompts_per_process(run.config, jax.process_count())
  global_start = run.position.data_position + jax.process_index() * per_process
  n = len(run.train_examples)
  return [run.train_examples[(global_start + i) % n] for i in range(per_process)], global_start


def run_one_step(run: Run) -> dict[str, float]:
  """One optimizer step: sample G per prompt -> verify -> teacher contexts -> batch -> update -> log."""
  cfg = run.config
  step = run.position.step
  step_rng = jax.random.fold_in(run.rng, step)
  times = {}
  t0 = time.perf_counter()
  examples, group_offset = next_prompts(run)
  groups = rollouts.sample_and_verify(
      run, examples, jax.random.fold_in(step_rng, 1), group_size=cfg.sampling.group_size,
      temperature=cfg.sampling.temperature, max_new_tokens=cfg.sampling.max_new_tokens,
      first_prompt_id=group_offset, training=True)
  times["time/sample_and_verify_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  groups = rollouts.with_teacher_contexts(
      groups, run.peer_config, run.tokenizer, enable_thinking=cfg.sampling.enable_thinking, step=step,
      first_group_index=group_offset)
  batch = global_batch(run, build_batch(run, groups))
  times["time/host_other_s"] = time.perf_counter() - t1
  t2 = time.perf_counter()
  run.state, run.teacher, metrics = run.step_fn(run.state, run.teacher, batch, jax.random.fold_in(step_rng, 0))
  metrics = jax.device_get(metrics)
  times["time/train_step_s"] = time.perf_counter() - t2
  applied = bool(metrics.update_applied)
  nonfinite = 0 if applied else run.position.nonfinite_in_a_row + 1
  run.position = checkpointing.RunPosition(
      step=step + 1, data_position=run.position.data_position + cfg.data.prompts_per_step,
      nonfinite_in_a_row=nonfinite)
  record = step_record(run, groups, metrics, times)
  if methods.get(cfg.method).uses_teacher_contexts:
    for message in peers.context_warnings([g.contexts for g in groups], texts_of(groups), run.peer_config):
      run.logger.warning(f"step {step}: {message}")
  if not applied:
    run.logger.info(f"step {step}: non-finite loss or gradients; update skipped ({nonfinite} in a row)")
    if nonfinite >= cfg.train.max_nonfinite_in_a_row:
      raise TrainingError(
          f"{nonfinite} non-finite updates in a row (train.max_nonfinite_in_a_row="
          f"{cfg.train.max_nonfinite_in_a_row}); stopping. Checkpoints are untouched; the last good one is "
          f"step {run.checkpointer.latest_step() if run.checkpointer else None}")
  if cfg.logging.rollout_sample_every and step % cfg.logging.rollout_sample_every == 0:
    run.logger.write_rollouts(step, groups, cfg.logging.rollout_samples)
  return record


def global_batch(run: Run, batch: batching.TrainBatch) -> batching.TrainBatch:
  """This process's rows -> global arrays sharded over data x fsdp."""
  if jax.process_count() == 1:
    return batch
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(run.mesh, np.ndim(x)), np.asarray(x)),
      batch)


def texts_of(groups: Sequence[RolloutGroup]) -> list[str]:
  return [text for g in groups for text in g.responses]


def rollout_metrics(groups: Sequence[RolloutGroup]) -> dict[str, float]:
  success = np.array([g.successes for g in groups], bool)  # [prompts, G]
  rewards = np.array([r for g in groups for r in g.rewards], float)
  out = {
      "rollout/reward_mean": float(rewards.mean()),
      "rollout/success_rate": float(success.mean()),
      "rollout/mixed_group_frac": float(np.mean(success.any(1) & ~success.all(1))),
      "rollout/response_len_mean": float(np.mean([len(r) for g in groups for r in g.response_tokens])),
      "rollout/length_finish_frac": float(np.mean([f == "length" for g in groups for f in g.finish_reasons])),
  }
  out.update(peers.context_stats([g.contexts for g in groups]))
  return out


def step_record(run: Run, groups: Sequence[RolloutGroup], metrics, times: dict[str, float]) -> dict[str, float]:
  """What a step logs: its rollouts, teacher contexts, train-step metrics and timings."""
  record = rollout_metrics(groups)
  if run.peer_config.use_summaries:
    record.update(peers.summary_stats(texts_of(groups)))
  record.update(flatten_metrics(metrics))
  record.update(times)
  total = sum(times.values())
  record["time/step_s"] = total
  record["throughput/sampled_tokens_per_s"] = sum(len(r) for g in groups for r in g.response_tokens) / max(total, 1e-9)
  return record


@dataclasses.dataclass(frozen=True)
class RunSummary:
  steps: int
  before: Optional[EvalResult]
  after: Optional[EvalResult]
  log_dir: str


def train(config) -> RunSummary:
  run = setup(config)
  cfg = run.config
  before = after = None
  try:
    if cfg.eval.at_start and run.position.step == 0 and run.eval_examples:
      before = evaluate(run, run.eval_examples, jax.random.key(cfg.seed + 1))
      run.logger.log_eval(0, before, "before")
    while run.position.step < cfg.train.steps:
      record = run_one_step(run)
      step = run.position.step
      run.logger.log(step, record)
      due = step % cfg.checkpoint.every == 0 or step == cfg.train.steps
      # A skipped (non-finite) update leaves the last good checkpoint as the one to resume from.
      if run.checkpointer and due and record["update_applied"] == 1.0:
        run.checkpointer.save(step, run.checkpoint_arrays(), run.position)
      if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
        run.logger.log_eval(step, evaluate(run, run.eval_examples, jax.random.key(cfg.seed + 1)), "periodic")
    if cfg.eval.at_end and run.eval_examples:
      after = evaluate(run, run.eval_examples, jax.random.key(cfg.seed + 1))
      run.logger.log_eval(run.position.step, after, "after")
  finally:
    if run.checkpointer:
      run.checkpointer.close()
    # The verifier pool is process-wide (reused by later runs, closed at exit).
    run.logger.close()
  return RunSummary(steps=run.position.step, before=before, after=after, log_dir=run.logger.directory)
