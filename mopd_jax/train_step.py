"""The pure, jitted update: student forward/backward, teacher forward, optax, teacher update.

`make_train_step` closes over the static parts (graph definitions, optimizer, a frozen
`StepConfig`) and returns `step(train_state, teacher_state, batch, rng) -> (train_state,
teacher_state, StepMetrics)`, a pure function of pytrees. `jit_train_step` gives it
explicit shardings and donates the states.

Teacher modes (MOPD_SPEC.md section 4):
- `ema`: teacher params <- (1 - rate) * teacher + rate * student, after each applied update.
- `trust_region`: teacher logits = lerp(initial-model logits, current-student logits, rate),
  both under the teacher context; TeacherState.params holds the initial model.
- `frozen`: the initial student; `external`: another model (its own graphdef), never updated.
The teacher forward runs outside `value_and_grad`: no gradient, no saved activations.

Micro-batches (`StepConfig.micro_batch_rows`): the rows are split into whole groups and a
`lax.scan` runs student, teacher and reference forwards and the student backward one
micro-batch at a time, summing float32 gradients; then one clip + optimizer update and one
teacher update. Each micro-batch contributes its loss's un-normalised sum (denominator 1); the
sum is divided once by the whole batch's denominator, so the update equals the whole batch's
(docs/GOTCHAS.md). Loss and metrics are the loss function applied to the whole batch's
per-token values gathered from the scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from mopd_jax import losses, sharding
from mopd_jax.batching import TrainBatch
from mopd_jax.models import positions_from_segments

Array = jax.Array
TEACHER_MODES = ("ema", "trust_region", "frozen", "external")
DISTILL = "distill"
METHOD_KINDS = (DISTILL, "grpo", "dpo", "simpo", "sft")


@flax.struct.dataclass
class TrainState:
  step: Array  # [] int32, optimizer steps applied
  params: Any  # nnx.State of the student's nnx.Param
  opt_state: Any


@flax.struct.dataclass
class TeacherState:
  """EMA / external / frozen teacher's params, or the initial model (trust region, and the
  reference of the GRPO KL and DPO). None when the method needs no second model."""

  params: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static options of the update. Hashable."""

  loss: str = DISTILL  # one of METHOD_KINDS
  teacher_mode: str = "ema"
  teacher_rate: float = 0.05  # EMA rate, or the trust-region lerp rate
  group_size: int = 8
  distill: losses.DistillConfig = losses.DistillConfig()
  grpo: losses.GRPOConfig = losses.GRPOConfig()
  grpo_normalize_std: bool = True
  grpo_use_kl: bool = False
  dpo: losses.DPOConfig = losses.DPOConfig()
  simpo: losses.SimPOConfig = losses.SimPOConfig()
  max_pairs_per_group: int = 1
  # Rows per micro-batch, a multiple of group_size (0: the whole batch at once). Memory grows
  # with the micro-batch; the update is the whole batch's.
  micro_batch_rows: int = 0

  def __post_init__(self):
    if self.loss not in METHOD_KINDS:
      raise ValueError(f"StepConfig.loss: unknown {self.loss!r}; known: {METHOD_KINDS}")
    if self.teacher_mode not in TEACHER_MODES:
      raise ValueError(f"StepConfig.teacher_mode: unknown {self.teacher_mode!r}; known: {TEACHER_MODES}")
    if not 0.0 <= self.teacher_rate <= 1.0:
      raise ValueError(f"StepConfig.teacher_rate must be in [0, 1], got {self.teacher_rate}")
    if self.group_size < 1:
      raise ValueError(f"StepConfig.group_size must be >= 1, got {self.group_size}")
    if self.micro_batch_rows < 0 or self.micro_batch_rows % self.group_size:
      raise ValueError(
          f"StepConfig.micro_batch_rows (config.train.micro_batch_rows) must be 0 or a positive multiple of "
          f"group_size={self.group_size} (a prompt's rollouts stay in one micro-batch), got {self.micro_batch_rows}")

  @property
  def needs_teacher(self) -> bool:
    """Whether TeacherState.params is used by this configuration."""
    if self.loss == DISTILL:
      return True
    return self.loss == "dpo" or (self.loss == "grpo" and self.grpo_use_kl)


@flax.struct.dataclass
class StepMetrics:
  loss: Array
  grad_norm: Array
  update_applied: Array  # 1.0, or 0.0 when the loss or gradients were not finite
  teacher_alignment_auc: Array  # mean per-group AUC of teacher scores vs success (NaN: none)
  alignment_groups: Array  # groups with both outcomes
  learning_rate: Array
  method: Any  # DistillMetrics | GRPOMetrics | PreferenceMetrics | SFTMetrics


def response_hidden(graphdef, params, tokens: Array, segments: Array, response_len: int) -> tuple[Array, Array]:
  """Final hidden states at the positions that predict the response, and the unembedding.

  Rows are [prompt | response]; position P - 1 + t predicts response token t.
  """
  model = nnx.merge(graphdef, params)
  out = model(tokens, positions_from_segments(segments), segments, return_logits=False)
  start = tokens.shape[1] - response_len - 1
  return out.hidden[:, start:start + response_len], model.unembedding()


def group_alignment_auc(scores: Array, success: Array, group_size: int) -> tuple[Array, Array]:
  """Mean over groups with both outcomes of the AUC of `scores` for `success` (ties 1/2)."""
  s = scores.reshape(-1, group_size)
  y = success.reshape(-1, group_size) > 0.5
  pos_neg = y[:, :, None] & ~y[:, None, :]  # (i success, j failure)
  wins = jnp.where(s[:, :, None] > s[:, None, :], 1.0, jnp.where(s[:, :, None] == s[:, None, :], 0.5, 0.0))
  pairs = jnp.sum(pos_neg, axis=(1, 2))
  auc = jnp.sum(wins * pos_neg, axis=(1, 2)) / jnp.maximum(pairs, 1)
  has_both = pairs > 0
  n = jnp.sum(has_both)
  mean = jnp.where(n > 0, jnp.sum(jnp.where(has_both, auc, 0.0)) / jnp.maximum(n, 1), jnp.nan)
  return mean, n.astype(jnp.float32)


def _teacher_side(cfg: StepConfig, student_graphdef, teacher_graphdef, student_params, teacher: TeacherState,
                  batch: TrainBatch):
  """Teacher hidden states / unembedding (pytrees) and the logit function; no gradient."""
  r = batch.response_tokens.shape[1]
  tok, seg = batch.teacher_tokens, batch.teacher_segments
  if cfg.teacher_mode == "trust_region":
    h0, w0 = response_hidden(student_graphdef, teacher.params, tok, seg, r)
    h1, w1 = response_hidden(student_graphdef, student_params, tok, seg, r)
    hidden, unembed = (h0, h1), (w0, w1)
    logit_fn = losses.trust_region_logit_fn(cfg.teacher_rate)
  else:
    graphdef = teacher_graphdef if cfg.teacher_mode == "external" else student_graphdef
    hidden, unembed = response_hidden(graphdef, teacher.params, tok, seg, r)
    logit_fn = None
  return lax.stop_gradient(hidden), lax.stop_gradient(unembed), logit_fn


def teacher_hidden(cfg: StepConfig, student_graphdef, teacher_graphdef, student_params, teacher: TeacherState,
                   batch: TrainBatch):
  """The teacher's forward of a distillation step on its own (no gradient): its hidden states at
  the response positions (a pair for `trust_region`). `mopd_jax.aot` compiles and sizes it."""
  return _teacher_side(cfg, student_graphdef, teacher_graphdef, student_params, teacher, batch)[0]


def _reference_logp(cfg: StepConfig, student_graphdef, teacher: TeacherState, batch: TrainBatch) -> Array:
  r = batch.response_tokens.shape[1]
  h, w = response_hidden(student_graphdef, teacher.params, batch.student_tokens, batch.student_segments, r)
  logp, _ = losses.chunked_target_logp(
      h, w, batch.response_tokens, temperature=cfg.distill.temperature, chunk_size=cfg.distill.chunk_size)
  return lax.stop_gradient(logp)


def _preference_batch(batch: TrainBatch, cfg: StepConfig, ref_seq_logp: Optional[Array]) -> losses.PreferenceBatch:
  """In-jit version of `losses.build_preference_pairs`: best j-th vs worst j-th per group."""
  g = cfg.group_size
  rewards = batch.rewards.reshape(-1, g)
  order = jnp.argsort(-rewards, axis=1, stable=True)
  base = (jnp.arange(rewards.shape[0]) * g)[:, None]
  pairs = min(cfg.max_pairs_per_group, g // 2)
  hi, lo = order[:, :pairs], order[:, ::-1][:, :pairs]
  margin = jnp.take_along_axis(rewards, hi, 1) - jnp.take_along_axis(rewards, lo, 1)
  return losses.PreferenceBatch(
      response_mask=batch.response_mask, chosen=(base + hi).reshape(-1), rejected=(base + lo).reshape(-1),
      pair_mask=(margin > 0).astype(jnp.float32).reshape(-1), ref_seq_logp=ref_seq_logp)


def _side_inputs(cfg: StepConfig, student_graphdef, teacher_graphdef, student_params, teacher: TeacherState,
                 batch: TrainBatch):
  """The loss's inputs without gradient: (teacher side or None, reference log-probs or None)."""
  if cfg.loss == DISTILL:
    return _teacher_side(cfg, student_graphdef, teacher_graphdef, student_params, teacher, batch), None
  if cfg.needs_teacher:
    return None, _reference_logp(cfg, student_graphdef, teacher, batch)
  return None, None


def _student_values(cfg: StepConfig, student_graphdef, params, batch: TrainBatch, teacher_inputs):
  """The per-token values the loss reads, with gradient: `TokenStats` (distillation) or the
  student's log-probs of the response tokens [B, R] (baselines)."""
  r = batch.response_tokens.shape[1]
  targets = batch.response_tokens
  hidden, unembed = response_hidden(student_graphdef, params, batch.student_tokens, batch.student_segments, r)
  if cfg.loss == DISTILL:
    t_hidden, t_unembed, logit_fn = teacher_inputs
    d = cfg.distill
    return losses.chunked_token_stats(
        hidden, t_hidden, unembed, t_unembed, targets,
        top_k=d.top_k if d.full_logits else None, use_tail=d.use_tail, alpha=d.alpha,
        temperature=d.temperature, chunk_size=d.chunk_size, full_logits=d.full_logits,
        teacher_logit_fn=logit_fn)
  logp, _ = losses.chunked_target_logp(
      hidden, unembed, targets, temperature=cfg.distill.temperature, chunk_size=cfg.distill.chunk_size)
  return logp


def _distill_batch(cfg: StepConfig, batch: TrainBatch) -> losses.DistillBatch:
  return losses.DistillBatch(
      targets=batch.response_tokens, response_mask=batch.response_mask, distill_mask=batch.distill_mask,
      old_logp=batch.sampler_logprobs, step_ids=batch.step_ids if cfg.distill.step_level else None)


def _baseline_inputs(cfg: StepConfig, batch: TrainBatch, ref_logp: Optional[Array]) -> tuple[Any, Any]:
  """(typed batch, config) of the baseline loss `losses.BASELINE_LOSSES[cfg.loss]`."""
  if cfg.loss == "grpo":
    adv = losses.group_advantages(
        batch.rewards.reshape(-1, cfg.group_size), normalize_std=cfg.grpo_normalize_std).reshape(-1)
    return losses.GRPOBatch(old_logp=batch.sampler_logprobs, advantages=adv,
                            response_mask=batch.response_mask, ref_logp=ref_logp), cfg.grpo
  if cfg.loss in ("dpo", "simpo"):
    ref_seq = None if ref_logp is None else losses.sequence_logp(ref_logp, batch.response_mask)
    return _preference_batch(batch, cfg, ref_seq), cfg.dpo if cfg.loss == "dpo" else cfg.simpo
  return losses.SFTBatch(batch.response_mask, batch.success), losses.SFTConfig()


def _loss_from_values(cfg: StepConfig, batch: TrainBatch, values, ref_logp: Optional[Array],
                      denominator: Optional[Array | float] = None):
  """(loss, method metrics, teacher scores [B] or None) from `_student_values`.

  `denominator`: the count the loss divides by instead of this batch's (see `aggregate_loss`).
  """
  if cfg.loss == DISTILL:
    loss, metrics = losses.mopd_loss_from_stats(values, _distill_batch(cfg, batch), cfg.distill, denominator)
    return loss, metrics, jnp.sum(values.teacher_logp * batch.response_mask, axis=-1)
  mbatch, mconfig = _baseline_inputs(cfg, batch, ref_logp)
  loss, metrics = losses.BASELINE_LOSSES[cfg.loss](values, mbatch, mconfig, denominator)
  return loss, metrics, None


def _loss_denominator(cfg: StepConfig, batch: TrainBatch, values, ref_logp: Optional[Array]) -> Array:
  """The count the loss of `batch` divides by (no gradient)."""
  if cfg.loss == DISTILL:
    return losses.mopd_loss_denominator(values, _distill_batch(cfg, batch), cfg.distill)
  mbatch, mconfig = _baseline_inputs(cfg, batch, ref_logp)
  return lax.stop_gradient(losses.BASELINE_DENOMINATORS[cfg.loss](mbatch, mconfig))


def num_micro_batches(cfg: StepConfig, rows: int, mesh: Optional[jax.sharding.Mesh] = None) -> int:
  """Micro-batches of a batch of `rows` rows; 1: the whole batch at once (no accumulation)."""
  mb = cfg.micro_batch_rows
  if mb == 0 or mb == rows:
    return 1
  field = f"StepConfig.micro_batch_rows (config.train.micro_batch_rows) = {mb}"
  if rows % mb:
    raise ValueError(f"{field} does not divide the batch's {rows} rows")
  shards = sharding.num_batch_shards(mesh) if mesh is not None else 1
  if mb % shards:
    raise ValueError(f"{field} is not divisible by the data x fsdp mesh size {shards} (each micro-batch's rows "
                     "are spread over the batch shards)")
  return rows // mb


def make_train_step(
    student_graphdef,
    optimizer: optax.GradientTransformation,
    cfg: StepConfig,
    teacher_graphdef=None,
    learning_rate_fn: Optional[Callable[[Array], Array]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
):
  """The pure update function for one batch (see module docstring).

  `mesh`: the mesh the step is jitted over; the models are traced under it so that per-device
  kernels (splash attention) can wrap themselves in `shard_map`.
  """
  if cfg.teacher_mode == "external" and teacher_graphdef is None:
    raise ValueError("teacher_mode='external' needs the external teacher's graphdef")

  def step(state: TrainState, teacher: TeacherState, batch: TrainBatch, rng: Array):
    with sharding.activation_mesh(mesh):
      return unsharded_step(state, teacher, batch, rng)

  def whole_batch_grads(state: TrainState, teacher: TeacherState, batch: TrainBatch):
    side = _side_inputs(cfg, student_graphdef, teacher_graphdef, state.params, teacher, batch)

    def loss_fn(params):
      values = _student_values(cfg, student_graphdef, params, batch, side[0])
      loss, metrics, teacher_scores = _loss_from_values(cfg, batch, values, side[1])
      return loss, (metrics, teacher_scores)

    (loss, (method_metrics, teacher_scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, method_metrics, teacher_scores, grads

  def accumulated_grads(state: TrainState, teacher: TeacherState, batch: TrainBatch, micro_batches: int):
    # [rows, ...] -> [M, rows / M, ...]: micro-batch m holds whole consecutive groups, its rows
    # spread over the batch shards (a reshard of the small integer batch, not of activations).
    def split(x: Array) -> Array:
      x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
      spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
      return sharding.constrain(x, mesh, None if mesh is None else jax.sharding.NamedSharding(mesh, spec))

    def body(acc, micro: TrainBatch):
      teacher_inputs, ref_logp = _side_inputs(cfg, student_graphdef, teacher_graphdef, state.params, teacher, micro)

      def sum_loss(params):
        values = _student_values(cfg, student_graphdef, params, micro, teacher_inputs)
        # Denominator 1: the un-normalised sum; the whole batch's count divides it after the scan.
        loss, _, _ = _loss_from_values(cfg, micro, values, ref_logp, denominator=1.0)
        return loss, lax.stop_gradient(values)

      grads, values = jax.grad(sum_loss, has_aux=True)(state.params)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, (values, ref_logp)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    acc, (values, ref_logp) = lax.scan(body, zeros, jax.tree.map(split, batch))
    # [M, rows / M, ...] -> [rows, ...]: back in the batch's row order.
    values, ref_logp = jax.tree.map(lambda x: sharding.constrain(x.reshape(-1, *x.shape[2:]), mesh),
                                    (values, ref_logp))
    denominator = jnp.maximum(_loss_denominator(cfg, batch, values, ref_logp), 1.0)
    grads = jax.tree.map(lambda a, p: (a / denominator).astype(p.dtype), acc, state.params)
    loss, method_metrics, teacher_scores = _loss_from_values(cfg, batch, values, ref_logp)
    return loss, method_metrics, teacher_scores, grads

  def unsharded_step(state: TrainState, teacher: TeacherState, batch: TrainBatch, rng: Array):
    del rng  # the update is deterministic; kept in the signature for stochastic variants
    micro_batches = num_micro_batches(cfg, batch.response_tokens.shape[0], mesh)
    if micro_batches == 1:
      loss, method_metrics, teacher_scores, grads = whole_batch_grads(state, teacher, batch)
    else:
      loss, method_metrics, teacher_scores, grads = accumulated_grads(state, teacher, batch, micro_batches)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Non-finite guard: compute the update on zeroed grads, then keep the old state.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state))

    new_teacher = teacher
    if cfg.loss == DISTILL and cfg.teacher_mode == "ema":
      rate = jnp.where(finite, cfg.teacher_rate, 0.0)
      new_teacher = TeacherState(params=jax.tree.map(
          lambda t, s: ((1.0 - rate) * t + rate * s).astype(t.dtype), teacher.params, new_state.params))

    if teacher_scores is not None:
      auc, n_groups = group_alignment_auc(teacher_scores, batch.success, cfg.group_size)
    else:
      auc, n_groups = jnp.array(jnp.nan, jnp.float32), jnp.zeros((), jnp.float32)
    lr = learning_rate_fn(state.step) if learning_rate_fn is not None else jnp.array(jnp.nan, jnp.float32)
    metrics = StepMetrics(
        loss=loss, grad_norm=grad_norm, update_applied=finite.astype(jnp.float32),
        teacher_alignment_auc=auc, alignment_groups=n_groups, learning_rate=jnp.asarray(lr, jnp.float32),
        method=method_metrics)
    return new_state, new_teacher, metrics

  return step


def make_optimizer(
    learning_rate: float, *, warmup_steps: int = 0, total_steps: int = 0, schedule: str = "constant",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float = 1.0,
) -> tuple[optax.GradientTransformation, Callable[[Array], Array]]:
  """Adam(W) with global-norm clipping and a warmup + constant/cosine schedule."""
  if schedule == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), optax.constant_schedule(learning_rate)],
        [max(warmup_steps, 1)]) if warmup_steps else optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))
  else:
    raise ValueError(f"optim.schedule: unknown {schedule!r}; known: ('constant', 'cosine')")
  chain = []
  if grad_clip and grad_clip > 0:
    chain.append(optax.clip_by_global_norm(grad_clip))
  chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*chain), lr


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def init_teacher_state(cfg: StepConfig, student_params, external_params=None) -> TeacherState:
  if not cfg.needs_teacher:
    return TeacherState(params=None)
  if cfg.teacher_mode == "external" and cfg.loss == DISTILL:
    if external_params is None:
      raise ValueError("teacher.mode='external' needs the external teacher's params")
    return TeacherState(params=external_params)
  # A real copy: the teacher must not alias buffers that the student's update donates.
  return TeacherState(params=jax.tree.map(jnp.copy, student_params))


def jit_train_step(step_fn, mesh, state: TrainState, teacher: TeacherState, rules=sharding.DEFAULT_RULES):
  """jit with explicit shardings: params/optimizer by logical rules, batch rows over data x fsdp.

  Donates the train and teacher states: the caller must use the returned ones.
  """
  state_shardings = state_sharding_tree(state, mesh, rules)
  teacher_shardings = TeacherState(
      params=None if teacher.params is None else sharding.param_shardings(teacher.params, mesh, rules))
  batch_shardings = lambda b: jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), b)
  repl = sharding.replicated(mesh)

  jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, teacher_shardings, None, repl),
      out_shardings=(state_shardings, teacher_shardings, repl),
      donate_argnums=(0, 1))

  def run(state, teacher, batch: TrainBatch, rng):
    batch = jax.device_put(batch, batch_shardings(batch))
    return jitted(state, teacher, batch, rng)

  run.jitted = jitted  # exposed for compilation-count checks
  run.state_shardings = state_shardings
  run.teacher_shardings = teacher_shardings
  return run


def state_sharding_tree(state: TrainState, mesh, rules=sharding.DEFAULT_RULES) -> TrainState:
  """Shardings for a TrainState: params by rules; optimizer subtrees shaped like the params
  (Adam's moments) follow them; everything else (counts, scalars) is replicated."""
  param_sh = sharding.param_shardings(state.params, mesh, rules)
  params_def = jax.tree.structure(state.params)
  repl = sharding.replicated(mesh)
  is_params_like = lambda x: jax.tree.structure(x) == params_def
  opt_sh = jax.tree.map(lambda x: param_sh if is_params_like(x) else repl, state.opt_state, is_leaf=is_params_like)
  return TrainState(step=repl, params=param_sh, opt_state=opt_sh)
