"""The run configuration: one `ml_collections.ConfigDict` tree, methods chosen by name.

`base_config()` holds every field with the paper's defaults; `configs/*.py` start from it
and shrink or point it at data. `config.method` names a registered `methods.Method`, which
brings its peer preset and loss, so `--config.method=sdpo` is all a user types; each method
family reads its own section (`loss` for distillation, `grpo`, `dpo`, `simpo`).
`validate(config)` runs before any compute and names the offending field.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from mopd_jax import methods, peers, sharding
from mopd_jax.fields import ConfigError, Flag, Num, Options, Seq, Text  # noqa: F401  (ConfigError: public here)
from mopd_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mopd"
  c.seed = 0
  c.model = dict(
      preset="smollm2-135m",  # models.PRESETS name or tiny-<family>
      checkpoint="smollm2-gguf",  # HF dir, .gguf file, "smollm2-gguf", or "" (random init)
      tokenizer="",  # "" = the checkpoint's; a path otherwise
      param_dtype="float32",
      dtype="float32",
      remat=False,  # recompute each layer in the backward pass (long sequences, big models)
      remat_policy="nothing_saveable",  # what a remat layer keeps: a jax.checkpoint_policies name
      scan_layers=True,  # lax.scan over the stacked layers (False unrolls them: compile time grows with depth)
      attention_chunk=0,  # > 0: attention over blocks of this many queries (memory ~ block x keys)
      attention_impl="xla",  # "cudnn" (NVIDIA GPUs) / "splash" (TPUs): fused attention for full sequences
      # One matmul for q/k/v and one for gate/up per layer (ModelConfig.fused_projections). Tensor
      # parallelism then splits whole kv heads: mesh.tensor must divide the kv heads (False: any
      # split of the heads). A run's checkpoints hold the layout it trained with.
      fused_projections=True,
  )
  c.teacher = dict(mode="ema", rate=0.05, share_contexts=True, external_preset="", external_checkpoint="")
  c.sampling = dict(
      group_size=8, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=512, stop_strings=(),
      enable_thinking=False,
      # The sampler's params: "train" = the training layout as is (no copy); "no_fsdp" = gathered
      # over fsdp once per sampling call (tensor parallelism kept): sharding.sampling_rules.
      param_layout="train",
      # Continuous refill (sampling.py): decode this many rows at a time, a row whose sample ended
      # taking the next sample; 0 = all of a call's rows at once until the longest ends. Refill
      # after refill_free_rows rows are free (0 = decode_rows // 16). Single-process runs only.
      decode_rows=0, refill_free_rows=0)
  c.mopd = dict(
      preset="",  # "" = the method's preset; explicit overrides below
      overrides=ml_collections.ConfigDict({}, type_safe=False))
  # The distillation loss (losses.DistillConfig) and the aggregation every method shares.
  # top_k / is_clip: 0 = off. mismatch: "" (off) or "mask" (drop tokens whose trainer/sampler
  # ratio leaves [1/2, 2]); no "tis": is_clip's weight against the sampler's log-probs already is
  # that truncated-IS correction. agg_norm: the constant seq-mean-token-sum-norm divides by;
  # 0 = sampling.max_new_tokens. chunk_size: sequence positions per logits chunk (every method).
  c.loss = dict(
      alpha=0.5, top_k=100, use_tail=True, full_logits=True, is_clip=2.0, mismatch="",
      step_level=False, loss_agg="token-mean", agg_norm=0.0, chunk_size=512)
  # Each baseline's own options (losses.GRPOConfig, DPOConfig, SimPOConfig). GRPO clips as the
  # authors' baseline did (verl: clip_ratio_low 0.2, clip_ratio_high 0.28, dual clip
  # clip_ratio_c 3, no KL); clip_c = 0 or None turns the dual clip off.
  c.grpo = dict(clip_eps=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.001, use_kl=False, normalize_std=True)
  c.dpo = dict(beta=0.1, max_pairs_per_group=1)
  c.simpo = dict(beta=2.0, gamma=1.0, max_pairs_per_group=1)
  # lr: the peak learning rate of every method but dpo and simpo, which train at preference_lr
  # (the authors ran DPO and SimPO at 1e-6, MOPD and GRPO at 1e-5). So --config.optim.lr does not
  # change a dpo/simpo run: set --config.optim.preference_lr there (`learning_rate` picks one).
  c.optim = dict(lr=1e-5, preference_lr=1e-6, warmup_steps=0, schedule="constant", b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0)
  c.data = dict(
      task="reasoning_gym", options=ml_collections.ConfigDict({}, type_safe=False),
      train_size=1000, eval_size=200, eval_seed_offset=1_000_000,  # reasoning-gym seeds item i with seed + i
      prompts_per_step=32,  # per optimizer step for the whole run, split evenly over the processes
      path="",
      prompt_buckets=(64, 128, 256, 512, 1024, 2048),
      response_buckets=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
      teacher_prompt_buckets=(128, 256, 512, 1024, 2048, 4096, 8192, 10240),
      # Student prompts (chat-templated, as the sampler sees them) longer than max_prompt_len
      # (0 = the largest prompt bucket) are dropped at load time, train and eval alike (verl's
      # `filter_overlong_prompts`); False: such a prompt is an error at load time, naming it.
      max_prompt_len=0, filter_overlong_prompts=True)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # enabled with coordinator_address "": jax.distributed.initialize() finds everything (TPU VMs).
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)
  # micro_batch_rows: rows per micro-batch, gradients accumulated into one update per step
  # (0 = the whole batch at once); a multiple of sampling.group_size dividing the step's rows.
  c.train = dict(steps=100, max_nonfinite_in_a_row=3, micro_batch_rows=0)
  c.eval = dict(every=0, num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=512, at_start=True,
                at_end=True, batch_prompts=32)
  c.checkpoint = dict(dir="", every=10, keep=3, async_save=True)
  c.logging = dict(dir="", rollout_sample_every=10, rollout_samples=4, progress=True)
  # success_threshold: a training rollout succeeds when its reward >= this (graded rewards, e.g.
  # the fraction of unit tests passed). 1.0 keeps each verifier's own success, which for every
  # built-in verifier is reward == 1. Evaluation always counts the verifier's own success (mean@k
  # of fully solved items, as reported).
  c.verifier = dict(num_workers=2, deadline_s=10.0, success_threshold=1.0)
  return c


def apply_method(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  methods.get(name)  # a clear error for an unknown name
  config.method = name
  return config


def peer_config(config) -> peers.PeerConfig:
  preset = config.mopd.preset or methods.get(config.method).peer_preset or "mopd_2s1f"
  return peers.get_preset(preset, seed=config.seed, **dict(config.mopd.overrides))


def learning_rate(config) -> float:
  """The run's peak learning rate, the method's pick: `optim.preference_lr` for DPO and SimPO
  (`methods.PairwisePreference`), `optim.lr` otherwise."""
  return methods.get(config.method).learning_rate(config.optim)


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


# ----------------------------------------------------------------------------- per-field rules
# Each leaf of `base_config()` has a rule: its type and range, checked first in `validate`, so
# nothing below (or in the run) meets a nan, an inf, a string or a bool where a number belongs.
# The method sections (`methods.config_fields()`: loss, teacher mode/rate, grpo, dpo, simpo) are
# validated once, by the methods' typed options; every other field is one line in FIELD_RULES
# (tests/test_config_validation.py fails for a field with neither). Cross-field constraints stay
# as explicit checks in `validate`.


def _presets() -> tuple[str, ...]:
  from mopd_jax.models.config import FAMILIES, PRESETS
  return tuple(PRESETS) + ("tiny",) + tuple(f"tiny-{f}" for f in FAMILIES)


def _tasks() -> tuple[str, ...]:
  from mopd_jax.tasks import registered_tasks
  return registered_tasks()


_COUNT = Num(int, ge=1)  # sizes, counts, periods that divide
_NONNEG_INT = Num(int, ge=0)
_POS = Num(float, gt=0)
_NONNEG = Num(float, ge=0)
_PROB = Num(float, gt=0, le=1)  # (0, 1]
_MOMENT = Num(float, ge=0, lt=1)  # Adam's b1, b2: [0, 1)
_MESH_AXIS = Num(int, ge=1, also=(-1,))  # -1: the devices left over
_DTYPE = Text(lambda: ("float32", "bfloat16"))
_BUCKETS = Seq(_COUNT, nonempty=True, doc="a non-empty sequence of positive ints")

FIELD_RULES: dict[str, Any] = {
    "method": Text(),  # methods.get names the registered ones
    "seed": _NONNEG_INT,
    "model.preset": Text(_presets), "model.checkpoint": Text(), "model.tokenizer": Text(),
    "model.param_dtype": _DTYPE, "model.dtype": _DTYPE, "model.remat": Flag(), "model.remat_policy": Text(),
    "model.scan_layers": Flag(), "model.attention_chunk": _NONNEG_INT, "model.attention_impl": Text(),
    "model.fused_projections": Flag(),
    "teacher.external_preset": Text(lambda: ("",) + _presets()),
    "teacher.external_checkpoint": Text(),
    "sampling.group_size": _COUNT, "sampling.temperature": _POS, "sampling.top_p": _PROB,
    "sampling.top_k": Num(int, ge=0, also=(None,)), "sampling.max_new_tokens": _COUNT,
    "sampling.stop_strings": Seq(Text()), "sampling.enable_thinking": Flag(), "sampling.param_layout": Text(),
    "sampling.decode_rows": _NONNEG_INT, "sampling.refill_free_rows": _NONNEG_INT,
    "mopd.preset": Text(lambda: ("",) + tuple(peers.PEER_PRESETS)), "mopd.overrides": Options(),
    "optim.lr": _POS, "optim.preference_lr": _POS, "optim.warmup_steps": _NONNEG_INT,
    "optim.schedule": Text(lambda: ("constant", "cosine")), "optim.b1": _MOMENT, "optim.b2": _MOMENT,
    "optim.eps": _POS, "optim.weight_decay": _NONNEG, "optim.grad_clip": _NONNEG,  # grad_clip 0: off
    "data.task": Text(_tasks), "data.options": Options(), "data.train_size": _COUNT, "data.eval_size": _NONNEG_INT,
    "data.eval_seed_offset": _NONNEG_INT, "data.prompts_per_step": _COUNT, "data.path": Text(),
    "data.prompt_buckets": _BUCKETS, "data.response_buckets": _BUCKETS, "data.teacher_prompt_buckets": _BUCKETS, "data.max_prompt_len": _NONNEG_INT,
    "data.filter_overlong_prompts": Flag(),
    "mesh.data": _MESH_AXIS, "mesh.fsdp": _MESH_AXIS, "mesh.tensor": _MESH_AXIS,
    "distributed.enabled": Flag(), "distributed.coordinator_address": Text(), "distributed.num_processes": _COUNT,
    "distributed.process_id": _NONNEG_INT,
    "train.steps": _NONNEG_INT, "train.max_nonfinite_in_a_row": _COUNT, "train.micro_batch_rows": _NONNEG_INT,
    "eval.every": _NONNEG_INT, "eval.num_samples": _COUNT, "eval.temperature": _NONNEG,  # 0: greedy
    "eval.top_p": _PROB, "eval.max_new_tokens": _COUNT, "eval.at_start": Flag(), "eval.at_end": Flag(),
    "eval.batch_prompts": _COUNT,
    "checkpoint.dir": Text(), "checkpoint.every": _COUNT, "checkpoint.keep": _COUNT, "checkpoint.async_save": Flag(),
    "logging.dir": Text(), "logging.rollout_sample_every": _NONNEG_INT, "logging.rollout_samples": _NONNEG_INT,
    "logging.progress": Flag(),
    "verifier.num_workers": _COUNT, "verifier.deadline_s": _POS, "verifier.success_threshold": _PROB,
}


def _check_fields(config) -> None:
  """Every FIELD_RULES field the config has obeys its rule; then the cross-field basics."""
  for field, rule in FIELD_RULES.items():
    node = config
    for part in field.split("."):
      if part not in node:
        break
      node = node[part]
    else:
      problem = rule.problem(node)
      _check(problem is None, field, problem or "")
  if "mesh" in config:
    axes = [config.mesh[a] for a in ("data", "fsdp", "tensor")]
    _check(axes.count(-1) <= 1, "mesh", f"at most one axis may be -1 (the devices left over), got {tuple(axes)}")
  if "distributed" in config:
    d = config.distributed
    _check(not d.enabled or d.process_id < d.num_processes, "distributed.process_id",
           f"must be < distributed.num_processes={d.num_processes}, got {d.process_id}")


def validate(config, num_devices: int | None = None, *, platform: str | None = None) -> None:
  """Fail before any compute, naming the field.

  platform: the backend the run targets ("cpu", "gpu", "tpu"); None = `jax.default_backend()`.
  Ahead-of-time compilation for a TPU from a CPU process passes "tpu".
  """
  platform = platform or jax.default_backend()
  _check_fields(config)  # types and ranges of every field, before anything reads them
  methods.check_every_method_options(config)  # the method sections, by the typed options
  methods.from_config(config).check_run(config)
  if config.teacher.mode == "external":
    _check(bool(config.teacher.external_preset), "teacher.external_preset", "required for teacher.mode='external'")
  g = config.sampling.group_size
  _check(g >= 1, "sampling.group_size", f"must be >= 1, got {g}")
  _check(config.sampling.temperature > 0, "sampling.temperature",
         "must be > 0 for training (log-probs are taken at the sampling temperature)")
  _check(0.0 < config.sampling.top_p <= 1.0, "sampling.top_p", f"must be in (0, 1], got {config.sampling.top_p}")
  _check(0.0 < config.eval.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {config.eval.top_p}")
  _check(config.sampling.param_layout in sharding.SAMPLING_LAYOUTS, "sampling.param_layout",
         f"must be one of {sharding.SAMPLING_LAYOUTS}, got {config.sampling.param_layout!r}")
  _check(isinstance(config.model.attention_chunk, int) and config.model.attention_chunk >= 0,
         "model.attention_chunk", f"must be an int >= 0 (0 = dense attention), got {config.model.attention_chunk!r}")
  _check(config.model.remat_policy in REMAT_POLICIES, "model.remat_policy",
         f"must be one of {REMAT_POLICIES}, got {config.model.remat_policy!r}")
  _check(isinstance(config.model.scan_layers, bool), "model.scan_layers",
         f"must be True or False, got {config.model.scan_layers!r}")
  _check(config.model.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
         f"must be one of {ATTENTION_IMPLS}, got {config.model.attention_impl!r}")
  _check(config.model.attention_impl != "cudnn" or platform == "gpu", "model.attention_impl",
         f"'cudnn' needs an NVIDIA GPU backend; this run targets {platform!r}")
  _check(config.model.attention_impl != "splash" or platform == "tpu", "model.attention_impl",
         f"'splash' is the Pallas TPU flash-attention kernel and needs a TPU; this run targets {platform!r} "
         "(on NVIDIA GPUs 'cudnn' is the fused option, 'xla' runs everywhere)")
  _check(config.model.attention_impl != "cudnn" or config.model.dtype == "bfloat16", "model.attention_impl",
         f"'cudnn' needs model.dtype='bfloat16', got {config.model.dtype!r}")
  _check(config.data.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
  _check_prompt_limit(config.data)
  threshold = config.verifier.success_threshold
  # 0 would count a failed verification (reward 0: crash, timeout, no answer) as a success.
  _check(0.0 < threshold <= 1.0, "verifier.success_threshold", f"must be in (0, 1], got {threshold}")
  _check(config.train.steps >= 0, "train.steps", "must be >= 0")
  micro = config.train.micro_batch_rows
  rows = config.data.prompts_per_step * g  # the rows of one optimizer step, all processes together
  _check(isinstance(micro, int) and micro >= 0, "train.micro_batch_rows",
         f"must be an int >= 0 (0 = the whole batch at once), got {micro!r}")
  if micro:
    _check(micro % g == 0, "train.micro_batch_rows",
           f"{micro} is not a multiple of sampling.group_size={g} (a prompt's rollouts stay in one micro-batch)")
    _check(rows % micro == 0, "train.micro_batch_rows",
           f"{micro} does not divide the {rows} rows of a step (data.prompts_per_step x sampling.group_size)")
  _check(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  _check(config.optim.preference_lr > 0, "optim.preference_lr", f"must be > 0, got {config.optim.preference_lr}")
  if config.data.task in ("jsonl", "parquet", "tfds"):
    _check(bool(config.data.path), "data.path", f"task {config.data.task!r} needs a data file")
  if config.data.path:
    _check(os.path.exists(config.data.path), "data.path", f"{config.data.path} does not exist")
  if num_devices is not None:
    shape = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    fixed = 1
    for s in shape:
      fixed *= s if s != -1 else 1
    _check(num_devices % fixed == 0, "mesh", f"{shape} does not fit {num_devices} devices")
    batch_shards = (config.mesh.data if config.mesh.data != -1 else num_devices // fixed) * (
        config.mesh.fsdp if config.mesh.fsdp != -1 else num_devices // fixed)
    prompts = config.data.prompts_per_step  # per optimizer step, for the whole run
    _check(prompts % batch_shards == 0, "data.prompts_per_step",
           f"{prompts} prompts per step are not divisible by the data x fsdp mesh size {batch_shards} "
           "(a prompt's rollouts must stay on one shard)")
    if micro and micro != rows:
      _check(micro % batch_shards == 0, "train.micro_batch_rows",
             f"{micro} rows per micro-batch are not divisible by the data x fsdp mesh size {batch_shards}")
    decode_rows = config.sampling.decode_rows
    _check(decode_rows % batch_shards == 0, "sampling.decode_rows",
           f"{decode_rows} decode rows are not divisible by the data x fsdp mesh size {batch_shards}")
  refill_rows = config.sampling.refill_free_rows
  _check(refill_rows <= config.sampling.decode_rows, "sampling.refill_free_rows",
         f"{refill_rows} exceeds sampling.decode_rows={config.sampling.decode_rows} (0 there: refill is off)")
  processes = config.distributed.num_processes if config.distributed.enabled else 1
  _check(processes == 1 or not config.sampling.decode_rows, "sampling.decode_rows",
         f"continuous refill runs in one process; this run has {processes} (set 0)")
  _check(config.data.prompts_per_step % processes == 0, "data.prompts_per_step",
         f"{config.data.prompts_per_step} prompts per step (for the whole run) do not divide over {processes} "
         "processes: each process samples an equal share")
  try:
    peers_ = peer_config(config)
  except ValueError as e:
    raise ConfigError(f"config.mopd: {e}") from None
  _check_buckets(config.data, peers_)


def _check_buckets(data, peer_cfg: peers.PeerConfig) -> None:
  """Every length the run can produce fits a bucket: checked here, not mid-run."""
  for name in ("prompt_buckets", "response_buckets", "teacher_prompt_buckets"):
    buckets = tuple(data[name])
    _check(bool(buckets) and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets),
           f"data.{name}", f"must be a non-empty sequence of positive ints, got {buckets!r}")
  largest_teacher = max(data.teacher_prompt_buckets)
  # The limit bounds the chat-templated teacher prompt (rollouts.with_teacher_contexts), so it must fit.
  _check(peer_cfg.max_teacher_prompt_len <= largest_teacher, "mopd.overrides.max_teacher_prompt_len",
         f"{peer_cfg.max_teacher_prompt_len} exceeds the largest teacher prompt bucket {largest_teacher} "
         "(data.teacher_prompt_buckets): a teacher prompt filled to the limit would not fit any bucket")
  # A rollout whose context gets nothing is scored under the student's own prompt.
  _check(max(data.prompt_buckets) <= largest_teacher, "data.teacher_prompt_buckets",
         f"the largest teacher prompt bucket {largest_teacher} is smaller than the largest student prompt "
         f"bucket {max(data.prompt_buckets)} (data.prompt_buckets); an empty context is the student's prompt")


def _check_prompt_limit(data) -> None:
  """data.max_prompt_len: a kept prompt must fit a prompt bucket, or the sampler fails mid-run."""
  limit, largest = data.max_prompt_len, max(tuple(data.prompt_buckets), default=0)
  _check(isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0, "data.max_prompt_len",
         f"must be an int >= 0 (0 = the largest prompt bucket), got {limit!r}")
  _check(not largest or limit <= largest, "data.max_prompt_len",
         f"{limit} exceeds the largest prompt bucket {largest} (data.prompt_buckets): a prompt that long "
         "would be kept but could not be sampled")
  _check(isinstance(data.filter_overlong_prompts, bool), "data.filter_overlong_prompts",
         f"must be True or False, got {data.filter_overlong_prompts!r}")


def max_prompt_len(config) -> int:
  """The longest student prompt (chat-templated tokens) a run keeps: `data.max_prompt_len`, or
  the largest prompt bucket when it is 0."""
  return config.data.max_prompt_len or max(config.data.prompt_buckets)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision-style `get_config` argument: "tiny,method=grpo" -> {size: tiny, method: grpo}."""
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in out:
        raise ValueError(f"config argument: unknown key {key!r}; known: {sorted(out)}")
      out[key] = type(defaults[key])(value) if defaults[key] is not None else value
    else:
      out.size = part
  return out
