"""The MOPD host loop: data -> sample G -> verify -> peer contexts -> batch -> step -> log.

Reads top to bottom: `train(config)` builds a `Run` (models, tokenizer, mesh, jitted step,
checkpointer, data) once, optionally restores, then loops `run_one_step`. Everything traced
lives in `train_step.py` and `sampling.py`; this file only wires and does I/O.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from mopd_jax import batching, checkpointing, config_lib, methods, peers, sharding
from mopd_jax import sampling as sampling_lib
from mopd_jax.logging_lib import MetricsLogger, flatten_metrics
from mopd_jax.models import ModelConfig, get_preset, init_model
from mopd_jax.passk import aggregate_pass_at_k
from mopd_jax.tasks import load_task
from mopd_jax.tokenizer import Tokenizer
from mopd_jax.train_step import (
    StepConfig, TeacherState, TrainState, init_teacher_state, init_train_state, jit_train_step, make_optimizer,
    make_train_step)
from mopd_jax.types import Example, Message, Verdict
from mopd_jax.verifiers.base import VerifierPool, apply_success_threshold, default_pool


class TrainingError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- start-up


def compute_options(model_config, *, backward: bool = True) -> dict[str, Any]:
  """How the model computes, from `config.model`: its fields named like `ModelConfig` fields
  (dtype, remat, attention_chunk, attention_impl, and any later switch), param_dtype apart.
  Keyword arguments of `load_model_and_tokenizer` / `preset_model_config`: one mapping for
  the trainer and `mopd_jax.aot`. backward=False: a model never differentiated (no remat)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"param_dtype"}
  options = {k: model_config[k] for k in model_config if k in fields}
  if not backward:
    options["remat"] = False
  return options


def preset_model_config(preset: str, param_dtype: str, **compute: Any) -> ModelConfig:
  """A preset's architecture with the run's param dtype and `compute_options`; reads no file.

  With a checkpoint the architecture comes from the file instead, and a random-init run
  widens the vocabulary to its tokenizer's (`load_model_and_tokenizer`).
  """
  return get_preset(preset).replace(param_dtype=param_dtype, **compute)


def load_model_and_tokenizer(preset: str, checkpoint: str, tokenizer_path: str, param_dtype: str, dtype: str,
                             seed: int, mesh: Optional[jax.sharding.Mesh] = None, **compute: Any):
  """(model, tokenizer). checkpoint: HF dir, .gguf, "smollm2-gguf", or "" for random init.
  compute: ModelConfig fields saying how the model computes (remat, attention_impl, ...).
  mesh: checkpoint tensors are read straight into their shards (no full copy on one device)."""
  from mopd_jax import weights
  from mopd_jax.tokenizer import load_tokenizer

  compute = dict(compute, dtype=dtype)
  if checkpoint:
    path = weights.smollm2_gguf_path() if checkpoint == "smollm2-gguf" else checkpoint
    model, tokenizer = weights.load_pretrained(path, mesh=mesh, param_dtype=param_dtype)
    if any(getattr(model.config, k) != v for k, v in compute.items()):
      # How the model computes is a config switch; rebuild the graph with it, keep the params.
      graphdef, state = nnx.split(model)
      fresh = nnx.eval_shape(lambda: init_model(model.config.replace(**compute)))
      nnx.update(fresh, state)
      model = fresh
  else:
    cfg = preset_model_config(preset, param_dtype, **compute)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else weights.load_gguf_tokenizer(
        weights.smollm2_gguf_path())
    if cfg.vocab_size < tokenizer.vocab_size:
      cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    model = init_model(cfg, seed=seed)
  if tokenizer_path and checkpoint:
    tokenizer = load_tokenizer(tokenizer_path)
  return model, tokenizer


def check_same_tokenizer(student: Tokenizer, teacher: Tokenizer) -> None:
  probe = "MOPD tokenizer check: 12+34=46, café, \n\n```python\nprint('x')\n```"
  if (student.vocab_size != teacher.vocab_size or student.encode(probe) != teacher.encode(probe)
      or student.eos_ids != teacher.eos_ids):
    raise config_lib.ConfigError(
        "config.teacher.external_checkpoint: the external teacher's tokenizer differs from the student's "
        f"(vocab {teacher.vocab_size} vs {student.vocab_size}); MOPD scores the student's tokens with the "
        "teacher, so both must share one tokenizer")


def step_config(config) -> StepConfig:
  return StepConfig(method=methods.from_config(config), group_size=config.sampling.group_size,
                    micro_batch_rows=config.train.micro_batch_rows)


def load_examples(config) -> tuple[list[Example], list[Example]]:
  """(train, held-out eval). Procedural tasks use another seed for eval; files hold out a tail."""
  d = config.data
  options = dict(d.options)
  if d.path:
    options.setdefault("path", d.path)
  if d.task in ("reasoning_gym",) or "seed" in options or d.task in ("basic_arithmetic", "chain_sum", "countdown"):
    seed = options.pop("seed", config.seed)
    train = list(load_task(d.task, size=d.train_size, seed=seed, **options))
    # Held-out prompts never seen in training: draw candidates from another seed range and keep
    # the first eval_size that differ from every training prompt (small task spaces overlap).
    seen = {e.prompt for e in train}
    held_out = []
    for e in load_task(d.task, size=10 * d.eval_size, seed=seed + d.eval_seed_offset, **options):
      if e.prompt not in seen:
        seen.add(e.prompt)
        held_out.append(e)
      if len(held_out) == d.eval_size:
        break
    if len(held_out) < d.eval_size:
      raise config_lib.ConfigError(
          f"config.data.eval_size: only {len(held_out)} held-out prompts differ from the {len(train)} training "
          "ones; lower data.eval_size or data.train_size")
    return train, held_out
  examples = list(load_task(d.task, **options))
  if len(examples) <= d.eval_size:
    raise config_lib.ConfigError(
        f"config.data.eval_size: {d.eval_size} held-out examples requested but the task has {len(examples)}")
  split = len(examples) - d.eval_size  # not examples[:-eval_size]: eval_size 0 would empty training
  return examples[:split][:d.train_size], examples[split:]


@dataclasses.dataclass(frozen=True)
class PromptFilter:
  """What the overlong-prompt filter dropped at load time (verl's `filter_overlong_prompts`)."""

  max_prompt_len: int
  train_kept: int
  train_dropped: int
  eval_kept: int
  eval_dropped: int

  def message(self) -> str:
    return (f"prompts over data.max_prompt_len={self.max_prompt_len} tokens filtered out: {self.train_dropped} of "
            f"{self.train_kept + self.train_dropped} training, {self.eval_dropped} of "
            f"{self.eval_kept + self.eval_dropped} eval")


def drop_overlong_prompts(config, tokenizer: Tokenizer, examples: Sequence[Example],
                          peer_config: Optional[peers.PeerConfig], what: str) -> tuple[list[Example], int]:
  """(the examples whose student prompt fits `config_lib.max_prompt_len`, how many were dropped).

  A prompt is measured as the sampler will see it: `student_messages` (peer_config: training's
  instruction; None: evaluation's own prompt), chat template, `sampling.enable_thinking`. With
  data.filter_overlong_prompts=False the first longer prompt is an error naming it, here at load
  time rather than mid-run in the sampler. Dropping every prompt is an error too.
  """
  limit = config_lib.max_prompt_len(config)
  kept = []
  for i, e in enumerate(examples):
    n = len(chat_prompt_tokens(tokenizer, student_messages(e, peer_config), config.sampling.enable_thinking))
    if n <= limit:
      kept.append(e)
    elif not config.data.filter_overlong_prompts:
      raise config_lib.ConfigError(
          f"config.data.filter_overlong_prompts=False: {what} prompt {i} (example_id {e.example_id!r}) has {n} "
          f"tokens after the chat template, over data.max_prompt_len={limit}; set "
          "data.filter_overlong_prompts=True to drop such prompts, or raise data.max_prompt_len (and "
          "data.prompt_buckets)")
  if examples and not kept:
    raise config_lib.ConfigError(
        f"config.data.max_prompt_len: all {len(examples)} {what} prompts are longer than {limit} tokens after "
        "the chat template; nothing is left to sample")
  return kept, len(examples) - len(kept)


def filter_prompts(config, tokenizer: Tokenizer, peer_config: peers.PeerConfig, train: Sequence[Example],
                   held_out: Sequence[Example]) -> tuple[list[Example], list[Example], PromptFilter]:
  """`drop_overlong_prompts` over the training prompts (as training samples them) and the
  held-out ones (as evaluation does)."""
  train_kept, train_dropped = drop_overlong_prompts(config, tokenizer, train, peer_config, "training")
  eval_kept, eval_dropped = drop_overlong_prompts(config, tokenizer, held_out, None, "eval")
  stats = PromptFilter(max_prompt_len=config_lib.max_prompt_len(config), train_kept=len(train_kept),
                       train_dropped=train_dropped, eval_kept=len(eval_kept), eval_dropped=eval_dropped)
  return train_kept, eval_kept, stats


# ----------------------------------------------------------------------------- rollouts


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """One step's sampled groups, verified. Row r belongs to prompt r // G."""

  examples: Sequence[Example]
  prompt_tokens: Sequence[Sequence[int]]
  response_tokens: Sequence[Sequence[int]]
  response_logprobs: Sequence[Sequence[float]]
  texts: Sequence[str]
  verdicts: Sequence[Verdict]
  finish_reasons: Sequence[str]
  group_size: int
  # The chat messages example i was sampled from: its prompt, plus the summary instruction in
  # training (`peers.student_prompt`). Empty: the examples' own prompts.
  student_messages: Sequence[Sequence[Message]] = ()

  def messages(self, i: int) -> tuple[Message, ...]:
    return tuple(self.student_messages[i] if self.student_messages else self.examples[i].prompt)


def chat_prompt_tokens(tokenizer: Tokenizer, messages: Sequence[Message], enable_thinking: bool) -> list[int]:
  return tokenizer.apply_chat_template(
      [m.as_dict() for m in messages], add_generation_prompt=True, enable_thinking=enable_thinking)


def student_messages(example: Example, peer_config: Optional[peers.PeerConfig]) -> tuple[Message, ...]:
  """The chat messages the student samples `example` from: in training (a `peer_config`)
  `peers.student_prompt` (the summaries variant's instruction), in evaluation (None) its own
  prompt. One function for the sampler and the overlong-prompt filter, so both see one prompt."""
  return tuple(example.prompt) if peer_config is None else peers.student_prompt(example.prompt, peer_config)


def sampling_params(config, *, temperature: float, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
                    pad_id: int = 0, top_p: Optional[float] = None) -> sampling_lib.SamplingParams:
  """How the run samples (training rollouts and evaluation differ in temperature, top-p and
  length). top_p: None = `sampling.top_p` (training's); evaluation passes `eval.top_p`."""
  return sampling_lib.SamplingParams(
      temperature=temperature, top_p=config.sampling.top_p if top_p is None else top_p,
      top_k=config.sampling.top_k or None,
      max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids), pad_id=pad_id,
      stop_strings=tuple(config.sampling.stop_strings), prompt_buckets=tuple(config.data.prompt_buckets),
      generation_buckets=tuple(config.data.response_buckets))


def sample_and_verify(run: "Run", examples: Sequence[Example], rng, *, group_size: int, temperature: float,
                      max_new_tokens: int, first_prompt_id: int = 0, training: bool = False,
                      top_p: Optional[float] = None) -> Rollouts:
  """Sample G rollouts per example and verify them. `first_prompt_id`: the global index of
  examples[0], which keys each prompt's random stream (see `sampling.sample`). training: sample
  from `peers.student_prompt` (the summaries variant's instruction); evaluation (the default)
  samples the task's own prompt, as the authors' validation does. top_p: see `sampling_params`."""
  cfg = run.config
  messages = [student_messages(e, run.peer_config if training else None) for e in examples]
  prompts = [chat_prompt_tokens(run.tokenizer, m, cfg.sampling.enable_thinking) for m in messages]
  params = sampling_params(cfg, temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p,
                           stop_token_ids=tuple(run.tokenizer.eos_ids), pad_id=run.tokenizer.pad_id)
  result = sampling_lib.sample(
      (run.sampler_graphdef, run.sampler_params()), prompts, num_samples=group_size, rng=rng,
      sampling_params=params, mesh=run.sample_mesh,
      decode_fn=lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True),
      prompt_ids=[first_prompt_id + i for i in range(len(prompts))])
  responses, logprobs, texts = [], [], []
  for r in range(result.num_rows):
    n = int(result.lengths[r])
    responses.append(result.tokens[r, :n].tolist())
    # Old-policy log-probs at the sampling temperature (the trainer's distribution).
    logprobs.append(result.scaled_logprobs[r, :n].tolist())
    texts.append(result.texts[r])
  expanded = [examples[r // group_size] for r in range(len(responses))]
  verdicts = run.verifier_pool.verify(expanded, texts, deadline_s=cfg.verifier.deadline_s)
  broken = [v for v in verdicts if v.details.get("error") == "WorkerSetup"]
  if broken:
    # Infrastructure, not the model: training on all-zero rewards would be silently wrong.
    raise TrainingError(
        f"verifier workers could not start ({broken[0].feedback}); scripts that call the trainer must guard "
        "their entry point with `if __name__ == '__main__':` (workers re-import the main module)")
  if training:  # who counts as a peer success (and what verified SFT trains on); eval keeps full solves
    verdicts = [apply_success_threshold(v, cfg.verifier.success_threshold) for v in verdicts]
  return Rollouts(
      examples=examples, prompt_tokens=prompts, response_tokens=responses, response_logprobs=logprobs,
      texts=texts, verdicts=verdicts, finish_reasons=[f.value for f in result.finish_reasons],
      group_size=group_size, student_messages=messages)


def teacher_rows(run: "Run", rollouts: Rollouts, step: int, group_offset: int):
  """Teacher contexts for every rollout, tokenised: (contexts, teacher prompt tokens)."""
  g = rollouts.group_size
  groups = [
      # The prompt the student sampled from: the teacher's problem text is what the student read.
      peers.Group(prompt=rollouts.messages(i), responses=tuple(rollouts.texts[i * g:(i + 1) * g]),
                  verdicts=tuple(rollouts.verdicts[i * g:(i + 1) * g]))
      for i in range(len(rollouts.examples))]
  thinking = run.config.sampling.enable_thinking
  count = lambda text: len(run.tokenizer.encode(text))
  # The limit bounds the templated prompt, the length the teacher's bucket must hold.
  count_prompt = lambda messages: len(chat_prompt_tokens(run.tokenizer, messages, thinking))
  contexts = peers.build_teacher_contexts(
      groups, run.peer_config, step=step, group_indices=[group_offset + i for i in range(len(groups))],
      count_tokens=count, count_prompt_tokens=count_prompt)
  prompts = [chat_prompt_tokens(run.tokenizer, ctx.messages, thinking) for row in contexts for ctx in row]
  return contexts, prompts


def build_batch(run: "Run", rollouts: Rollouts, teacher_prompts, contexts) -> batching.TrainBatch:
  g = rollouts.group_size
  flat_ctx = [c for row in contexts for c in row]
  rows = batching.RolloutRows(
      student_prompts=[rollouts.prompt_tokens[r // g] for r in range(len(rollouts.response_tokens))],
      teacher_prompts=teacher_prompts,
      responses=rollouts.response_tokens,
      sampler_logprobs=rollouts.response_logprobs,
      distill_mask=[c.distill_mask for c in flat_ctx],
      rewards=[v.reward for v in rollouts.verdicts],
      success=[v.success for v in rollouts.verdicts],
      group_ids=[r // g for r in range(len(rollouts.response_tokens))],
      step_ids=[batching.step_ids_from_text_offsets([run.tokenizer.decode([t]) for t in resp])
                for resp in rollouts.response_tokens] if run.config.loss.step_level else None)
  d = run.config.data
  at_least = batching.local_max_lengths(rows)
  if jax.process_count() > 1:  # every process must pick the same buckets
    from jax.experimental import multihost_utils
    at_least = tuple(int(x) for x in np.max(multihost_utils.process_allgather(np.asarray(at_least)), axis=0))
  return batching.build_train_batch(
      rows, pad_id=run.tokenizer.pad_id, prompt_buckets=d.prompt_buckets, response_buckets=d.response_buckets,
      teacher_prompt_buckets=d.teacher_prompt_buckets, at_least=at_least)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvalResult:
  mean_at_k: float  # mean success over the k samples of every held-out prompt
  pass_at_k: float
  k: int
  num_prompts: int
  per_item_success: Sequence[Sequence[bool]]


def evaluate(run: "Run", examples: Sequence[Example], rng) -> EvalResult:
  c = run.config.eval
  k = c.num_samples
  successes: list[list[bool]] = []
  chunk = max(1, c.batch_prompts)
  # Every process evaluates the same prompts (the same ids, so the same rows); a prompt's rows
  # stay on one shard: pad each call to a multiple of this process's share of the shards.
  shards = max(sharding.num_batch_shards(run.sample_mesh) // jax.process_count(), 1)
  for start in range(0, len(examples), chunk):
    part = list(examples[start:start + chunk])
    rollouts = sample_and_verify(
        run, part + [part[0]] * (-len(part) % shards), rng, group_size=k, temperature=c.temperature,
        top_p=c.top_p, max_new_tokens=c.max_new_tokens, first_prompt_id=start)
    for i in range(len(part)):
      successes.append([v.success for v in rollouts.verdicts[i * k:(i + 1) * k]])
  (stats,) = aggregate_pass_at_k(successes, ks=(k,))
  return EvalResult(mean_at_k=float(np.mean(successes)), pass_at_k=stats.pass_at_k, k=k,
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
  prompt_filter: Optional[PromptFilter] = None  # what load time dropped (data.max_prompt_len)

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
  model, tokenizer = load_model_and_tokenizer(m.preset, m.checkpoint, m.tokenizer, m.param_dtype, seed=config.seed,
                                              mesh=mesh, **compute_options(m))
  graphdef, params = nnx.split(model, nnx.Param)
  params = sharding.shard_params(params, mesh)
  step_cfg = step_config(config)
  teacher_graphdef, external_params = None, None
  if step_cfg.method.external_teacher:
    t_model, t_tok = load_model_and_tokenizer(
        config.teacher.external_preset, config.teacher.external_checkpoint, "", m.param_dtype, seed=config.seed,
        mesh=mesh, **compute_options(m, backward=False))
    check_same_tokenizer(tokenizer, t_tok)
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
  train_examples, eval_examples, prompt_filter = filter_prompts(
      config, tokenizer, peer_config, *load_examples(config))
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
  cfg = run.config
  step = run.position.step
  step_rng = jax.random.fold_in(run.rng, step)
  times = {}
  t0 = time.perf_counter()
  examples, group_offset = next_prompts(run)
  rollouts = sample_and_verify(
      run, examples, jax.random.fold_in(step_rng, 1), group_size=cfg.sampling.group_size,
      temperature=cfg.sampling.temperature, max_new_tokens=cfg.sampling.max_new_tokens,
      first_prompt_id=group_offset, training=True)
  times["time/sample_and_verify_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  contexts, teacher_prompts = teacher_rows(run, rollouts, step, group_offset)
  batch = build_batch(run, rollouts, teacher_prompts, contexts)
  batch = global_batch(run, batch)
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
  record = rollout_metrics(rollouts, contexts)
  if run.peer_config.use_summaries:
    record.update(peers.summary_stats(rollouts.texts))
  if methods.get(cfg.method).uses_teacher_contexts:
    for message in peers.context_warnings(contexts, rollouts.texts, run.peer_config):
      run.logger.warning(f"step {step}: {message}")
  record.update(flatten_metrics(metrics))
  record.update(times)
  total = sum(times.values())
  record["time/step_s"] = total
  record["throughput/sampled_tokens_per_s"] = sum(map(len, rollouts.response_tokens)) / max(total, 1e-9)
  if not applied:
    run.logger.info(f"step {step}: non-finite loss or gradients; update skipped ({nonfinite} in a row)")
    if nonfinite >= cfg.train.max_nonfinite_in_a_row:
      raise TrainingError(
          f"{nonfinite} non-finite updates in a row (train.max_nonfinite_in_a_row="
          f"{cfg.train.max_nonfinite_in_a_row}); stopping. Checkpoints are untouched; the last good one is "
          f"step {run.checkpointer.latest_step() if run.checkpointer else None}")
  if cfg.logging.rollout_sample_every and step % cfg.logging.rollout_sample_every == 0:
    run.logger.write_rollouts(step, rollouts, contexts, cfg.logging.rollout_samples)
  return record


def global_batch(run: Run, batch: batching.TrainBatch) -> batching.TrainBatch:
  """This process's rows -> global arrays sharded over data x fsdp."""
  if jax.process_count() == 1:
    return batch
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(run.mesh, np.ndim(x)), np.asarray(x)),
      batch)


def rollout_metrics(rollouts: Rollouts, contexts) -> dict[str, float]:
  g = rollouts.group_size
  success = np.array([v.success for v in rollouts.verdicts], bool).reshape(-1, g)
  rewards = np.array([v.reward for v in rollouts.verdicts], float)
  out = {
      "rollout/reward_mean": float(rewards.mean()),
      "rollout/success_rate": float(success.mean()),
      "rollout/mixed_group_frac": float(np.mean(success.any(1) & ~success.all(1))),
      "rollout/response_len_mean": float(np.mean([len(r) for r in rollouts.response_tokens])),
      "rollout/length_finish_frac": float(np.mean([f == "length" for f in rollouts.finish_reasons])),
  }
  out.update(peers.context_stats(contexts))
  return out


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
