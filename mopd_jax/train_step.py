"""The pure, jitted update: student forward/backward, the method's no-gradient side, optax,
the method's teacher update.

`make_train_step` closes over the static parts (graph definitions, optimizer, a frozen
`StepConfig` holding the `methods.Method`) and returns `step(train_state, teacher_state, batch,
rng) -> (train_state, teacher_state, StepMetrics)`, a pure function of pytrees. `jit_train_step`
gives it explicit shardings and donates the states. The step never branches on the method:
the method object supplies its no-gradient inputs (teacher or reference forward), its per-token
values, its loss and its teacher update (`mopd_jax.methods`).

Micro-batches (`StepConfig.micro_batch_rows`): the rows are split into whole groups and a
`lax.scan` runs the method's forwards and the student backward one micro-batch at a time,
summing float32 gradients; then one clip + optimizer update and one teacher update. Each
micro-batch contributes its loss's un-normalised sum (denominator 1); the sum is divided once by
the whole batch's denominator, so the update equals the whole batch's (docs/GOTCHAS.md). Loss and
metrics are the loss function applied to the whole batch's per-token values gathered from the scan.

Non-finite guard: `optax.apply_if_finite` skips an update whose gradients (or loss) are not
finite and keeps the optimizer state; the trainer stops after `train.max_nonfinite_in_a_row`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mopd_jax import methods, sharding
from mopd_jax.batching import TrainBatch

Array = jax.Array
# optax.apply_if_finite gives up and applies a non-finite update after this many in a row; the
# trainer's own limit (train.max_nonfinite_in_a_row) stops the run long before.
_NEVER_APPLY_NONFINITE = 2**30


@flax.struct.dataclass
class TrainState:
  step: Array  # [] int32, optimizer steps applied
  params: Any  # nnx.State of the student's nnx.Param
  opt_state: Any


@flax.struct.dataclass
class TeacherState:
  """The method's second model: EMA / external / frozen teacher, the initial model (trust
  region), or the reference of the GRPO KL and DPO. params None when the method keeps none."""

  params: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static options of the update. Hashable."""

  method: methods.Method = methods.get(methods.DEFAULT_METHOD)
  group_size: int = 8
  # Rows per micro-batch, a multiple of group_size (0: the whole batch at once). Memory grows
  # with the micro-batch; the update is the whole batch's.
  micro_batch_rows: int = 0

  def __post_init__(self):
    if not isinstance(self.method, methods.Method):
      raise ValueError(f"StepConfig.method must be a methods.Method, got {self.method!r}")
    if self.group_size < 1:
      raise ValueError(f"StepConfig.group_size must be >= 1, got {self.group_size}")
    if self.micro_batch_rows < 0 or self.micro_batch_rows % self.group_size:
      raise ValueError(
          f"StepConfig.micro_batch_rows (config.train.micro_batch_rows) must be 0 or a positive multiple of "
          f"group_size={self.group_size} (a prompt's rollouts stay in one micro-batch), got {self.micro_batch_rows}")


@flax.struct.dataclass
class StepMetrics:
  loss: Array
  grad_norm: Array
  update_applied: Array  # 1.0, or 0.0 when the loss or gradients were not finite
  teacher_alignment_auc: Array  # mean per-group AUC of teacher scores vs success (NaN: none)
  alignment_groups: Array  # groups with both outcomes
  learning_rate: Array
  method: Any  # the method's metrics: DistillMetrics | GRPOMetrics | PreferenceMetrics | SFTMetrics


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


def teacher_hidden(cfg: StepConfig, student_graphdef, teacher_graphdef, student_params, teacher: TeacherState,
                   batch: TrainBatch):
  """A distillation step's teacher forward on its own (no gradient): its hidden states at the
  response positions (a pair for `trust_region`). `mopd_jax.aot` compiles and sizes it."""
  models = methods.Models(student_graphdef, teacher_graphdef)
  return cfg.method.no_grad_inputs(models, student_params, teacher.params, batch)[0]


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
  """The pure update function for one batch (see module docstring). `optimizer`: from
  `make_optimizer` (its state tells whether the update was applied).

  `mesh`: the mesh the step is jitted over; the models are traced under it so that per-device
  kernels (splash attention) can wrap themselves in `shard_map`.
  """
  method, g = cfg.method, cfg.group_size
  models = methods.Models(student_graphdef, teacher_graphdef)
  method.check_models(models)

  def step(state: TrainState, teacher: TeacherState, batch: TrainBatch, rng: Array):
    with sharding.activation_mesh(mesh):
      return unsharded_step(state, teacher, batch, rng)

  def whole_batch_grads(state: TrainState, teacher: TeacherState, batch: TrainBatch):
    inputs = method.no_grad_inputs(models, state.params, teacher.params, batch)

    def loss_fn(params):
      result = method.loss(batch, method.per_token_values(models, params, batch, inputs), g)
      return result.loss, result

    (_, result), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return result, grads

  def accumulated_grads(state: TrainState, teacher: TeacherState, batch: TrainBatch, micro_batches: int):
    # [rows, ...] -> [M, rows / M, ...]: micro-batch m holds whole consecutive groups, its rows
    # spread over the batch shards (a reshard of the small integer batch, not of activations).
    def split(x: Array) -> Array:
      x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
      spec = jax.sharding.PartitionSpec(None, *sharding.batch_spec(x.ndim - 1))
      return sharding.constrain(x, mesh, None if mesh is None else jax.sharding.NamedSharding(mesh, spec))

    def body(acc, micro: TrainBatch):
      inputs = method.no_grad_inputs(models, state.params, teacher.params, micro)

      def sum_loss(params):
        values = method.per_token_values(models, params, micro, inputs)
        # Denominator 1: the un-normalised sum; the whole batch's count divides it after the scan.
        return method.loss(micro, values, g, denominator=1.0).loss, lax.stop_gradient(values)

      grads, values = jax.grad(sum_loss, has_aux=True)(state.params)
      return jax.tree.map(lambda a, g_: a + g_.astype(jnp.float32), acc, grads), values

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    acc, values = lax.scan(body, zeros, jax.tree.map(split, batch))
    # [M, rows / M, ...] -> [rows, ...]: back in the batch's row order.
    values = jax.tree.map(lambda x: sharding.constrain(x.reshape(-1, *x.shape[2:]), mesh), values)
    denominator = jnp.maximum(method.loss_denominator(batch, values, g), 1.0)
    grads = jax.tree.map(lambda a, p: (a / denominator).astype(p.dtype), acc, state.params)
    return method.loss(batch, values, g), grads

  def unsharded_step(state: TrainState, teacher: TeacherState, batch: TrainBatch, rng: Array):
    del rng  # the update is deterministic; kept in the signature for stochastic variants
    if batch.group_size != g:
      raise ValueError(f"the batch has groups of {batch.group_size} rows, the step was built for group_size={g} "
                       "(config.sampling.group_size)")
    micro_batches = num_micro_batches(cfg, batch.response_tokens.shape[0], mesh)
    if micro_batches == 1:
      result, grads = whole_batch_grads(state, teacher, batch)
    else:
      result, grads = accumulated_grads(state, teacher, batch, micro_batches)

    grad_norm = optax.global_norm(grads)
    # apply_if_finite looks at the gradients only: a non-finite loss poisons them so that the
    # update is skipped too.
    grads = jax.tree.map(lambda x: jnp.where(jnp.isfinite(result.loss), x, jnp.nan), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
      raise TypeError("make_train_step needs an optimizer wrapped in optax.apply_if_finite (make_optimizer's is); "
                      f"its state tells whether the update was applied. Got state {type(opt_state).__name__}")
    applied = opt_state.last_finite
    new_state = TrainState(step=state.step + applied.astype(jnp.int32),
                           params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new_teacher = TeacherState(params=method.update_teacher(teacher.params, new_state.params, applied))

    if result.teacher_scores is not None:
      auc, n_groups = group_alignment_auc(result.teacher_scores, batch.success, g)
    else:
      auc, n_groups = jnp.array(jnp.nan, jnp.float32), jnp.zeros((), jnp.float32)
    lr = learning_rate_fn(state.step) if learning_rate_fn is not None else jnp.array(jnp.nan, jnp.float32)
    metrics = StepMetrics(
        loss=result.loss, grad_norm=grad_norm, update_applied=applied.astype(jnp.float32),
        teacher_alignment_auc=auc, alignment_groups=n_groups, learning_rate=jnp.asarray(lr, jnp.float32),
        method=result.metrics)
    return new_state, new_teacher, metrics

  return step


def make_optimizer(
    learning_rate: float, *, warmup_steps: int = 0, total_steps: int = 0, schedule: str = "constant",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float = 1.0,
) -> tuple[optax.GradientTransformation, Callable[[Array], Array]]:
  """Adam(W) with global-norm clipping and a warmup + constant/cosine schedule, skipping
  non-finite updates (`optax.apply_if_finite`; the train step reads its `last_finite`)."""
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
  return optax.apply_if_finite(optax.chain(*chain), _NEVER_APPLY_NONFINITE), lr


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def init_teacher_state(cfg: StepConfig, student_params, external_params=None) -> TeacherState:
  return TeacherState(params=cfg.method.init_teacher_params(student_params, external_params))


def jit_train_step(step_fn, mesh, state: TrainState, teacher: TeacherState, optimizer: optax.GradientTransformation,
                   rules=sharding.DEFAULT_RULES) -> "JittedStep":
  """jit with explicit shardings: params/optimizer by logical rules, batch rows over data x fsdp
  (numpy batches are placed by `in_shardings`).

  Donates the train and teacher states: the caller must use the returned ones.
  """
  state_shardings = state_sharding_tree(state, mesh, optimizer, rules)
  teacher_shardings = TeacherState(
      params=None if teacher.params is None else sharding.param_shardings(teacher.params, mesh, rules))
  repl = sharding.replicated(mesh)
  # A prefix for every TrainBatch leaf: rows over data x fsdp, the other dimensions whole.
  rows = sharding.batch_sharding(mesh, ndim=1)

  jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, teacher_shardings, rows, repl),
      out_shardings=(state_shardings, teacher_shardings, repl),
      donate_argnums=(0, 1))
  return JittedStep(jitted, state_shardings, teacher_shardings)


@dataclasses.dataclass(frozen=True)
class JittedStep:
  """`jit_train_step`'s result: call it like the step; `jitted` (to lower, or count
  compilations) and the states' shardings (to place them) ride along."""

  jitted: Any
  state_shardings: TrainState
  teacher_shardings: TeacherState

  def __call__(self, state: TrainState, teacher: TeacherState, batch: TrainBatch, rng: Array):
    return self.jitted(state, teacher, batch, rng)


def state_sharding_tree(state: TrainState, mesh, optimizer: optax.GradientTransformation,
                        rules=sharding.DEFAULT_RULES) -> TrainState:
  """Shardings for a TrainState: params by rules; the optimizer's copies of the params (Adam's
  moments) follow them (`optax.tree_map_params`); its counts and flags are replicated."""
  param_sh = sharding.param_shardings(state.params, mesh, rules)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, state.opt_state, param_sh,
                                 transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=param_sh, opt_state=opt_sh)
