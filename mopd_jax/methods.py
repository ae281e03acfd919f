"""Training methods: each one registered object that owns everything method-specific.

A method owns its typed options (read from the run configuration by `configured`), its peer
preset (how the host builds teacher contexts), which second model the step keeps (a teacher,
a reference, or none), and its loss. The train step (`train_step.make_train_step`) calls

    inputs = method.no_grad_inputs(models, student_params, teacher_params, batch)  # no gradient
    values = method.per_token_values(models, params, batch, inputs)                # with gradient
    result = method.loss(batch, values, group_size)                                # LossResult
    teacher_params = method.update_teacher(teacher_params, new_student_params, applied)

and branches on nothing; `config_lib` and the trainer look a method up by name (`from_config`).
Two families cover the paper: `Distillation` (a teacher scores the student's tokens under a
context; MOPD and its controls differ only in the peer preset) and `PolicyLogProbMethod` (losses
on the student's own per-token log-probs: GRPO, DPO, SimPO, verified SFT). Adding a method is one
`register(...)` of an instance (docs/ADDING_A_METHOD.md).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from mopd_jax import batching, fields, losses
from mopd_jax.batching import TrainBatch
from mopd_jax.fields import ConfigError
from mopd_jax.models import positions_from_segments, shared_prefix

Array = jax.Array
TEACHER_MODES = ("ema", "trust_region", "frozen", "external")
DEFAULT_METHOD = "mopd"


@dataclasses.dataclass(frozen=True)
class Models:
  """The static model definitions (graphdefs) a step runs."""

  student: Any
  external_teacher: Any = None


class LossResult(NamedTuple):
  loss: Array
  metrics: Any  # the method's metrics dataclass
  teacher_scores: Optional[Array]  # [B] summed teacher log-prob of each response (distillation)


def response_hidden(graphdef, params, tokens: Array, segments: Array, response_len: int) -> tuple[Array, Array]:
  """Final hidden states at the positions that predict the response, and the unembedding.

  Rows are [prompt | response]; position P - 1 + t predicts response token t.
  """
  model = nnx.merge(graphdef, params)
  out = model(tokens, positions_from_segments(segments), segments, return_logits=False)
  start = tokens.shape[1] - response_len - 1
  return out.hidden[:, start:start + response_len], model.unembedding()


def shared_context_hidden(graphdef, params, batch: TrainBatch) -> tuple[Array, Array]:
  """`response_hidden` of the rows `[teacher context | response]`, each group's distinct
  contexts encoded once (`models.shared_prefix`)."""
  model = nnx.merge(graphdef, params)
  out = shared_prefix.forward_with_shared_prefixes(
      model, batch.teacher_contexts, batch.teacher_context_segments, batch.response_tokens,
      batch.response_mask.astype(jnp.int32), batch.teacher_context_index, group_size=batch.group_size)
  # Response token 0 is predicted by the context's last position, token t by response position t - 1.
  hidden = jnp.concatenate([out.prefix_last_hidden[:, None], out.suffix_hidden[:, :-1]], axis=1)
  return hidden, model.unembedding()


def _typed(cls, paths: dict[str, str], **kwargs):
  """`cls(**kwargs)`, with a bad field reported as the run configuration's field (`paths`)."""
  try:
    return cls(**kwargs)
  except fields.FieldError as e:
    raise ConfigError(f"config.{paths[e.field]}: {e.message}") from None


def _zero_is_off(value: Any) -> Any:
  """The configuration's 0 for "off" (top_k, is_clip) is the typed options' None."""
  return None if type(value) in (int, float) and value == 0 else value


def agg_norm(config) -> float:
  """The constant of seq-mean-token-sum-norm: `loss.agg_norm`, or the longest response (0 or
  None). Not the padded length of the step's batch (verl's default), which follows the bucket."""
  value = config.loss.agg_norm
  return float(config.sampling.max_new_tokens) if value is None or _zero_is_off(value) is None else value


# ----------------------------------------------------------------------------- the interface


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
  """A training method. Frozen and hashable: the train step closes over it as a static. A
  subclass implements `per_token_values`, `loss` and `loss_denominator`."""

  name: str
  peer_preset: Optional[str] = None  # peers.PEER_PRESETS entry (distillation methods)
  needs_peers: bool = False  # needs >= 2 rollouts per prompt (contexts, advantages, pairs)

  # The configuration fields this family reads (for the config's every-field check).
  CONFIG_FIELDS: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    return cls.CONFIG_FIELDS

  # -- host side
  def configured(self, config) -> "Method":
    """This method with its typed options read from the run configuration (a ConfigDict);
    a bad option raises `ConfigError` naming its field."""
    return self

  def check_run(self, config) -> None:
    """Cross-field constraints of running this method (the chosen method only)."""
    g = config.sampling.group_size
    if self.needs_peers and g < 2:
      raise ConfigError(f"config.sampling.group_size: method {self.name!r} needs >= 2 rollouts per prompt, got {g}")

  def learning_rate(self, optim) -> float:
    return optim.lr

  @property
  def uses_teacher_contexts(self) -> bool:
    """Whether teacher contexts shape the loss (context warnings matter)."""
    return False

  # -- the second model: "copy" (of the student at the start), "external", or None
  @property
  def second_model(self) -> Optional[str]:
    return None

  @property
  def external_teacher(self) -> bool:
    """Whether the second model is another model (loaded from teacher.external_*)."""
    return self.second_model == "external"

  @property
  def teacher_context_forwards(self) -> int:
    """Forwards over [teacher context | response] per row (FLOP counts)."""
    return 0

  @property
  def reference_forward(self) -> bool:
    """Whether the second model also runs on the student rows (a reference log-prob)."""
    return False

  def check_models(self, models: Models) -> None:
    if self.external_teacher and models.external_teacher is None:
      raise ValueError(f"method {self.name!r} with an external teacher needs the teacher's graphdef")

  def init_teacher_params(self, student_params, external_params=None):
    if self.second_model is None:
      return None
    if self.second_model == "external":
      if external_params is None:
        raise ValueError(f"method {self.name!r}: teacher mode 'external' needs the external teacher's params")
      return external_params
    # A real copy: the teacher must not alias buffers that the student's update donates.
    return jax.tree.map(jnp.copy, student_params)

  # -- the step (pure, traced)
  def no_grad_inputs(self, models: Models, student_params, teacher_params, batch: TrainBatch) -> Any:
    return None

  @abc.abstractmethod
  def per_token_values(self, models: Models, params, batch: TrainBatch, inputs: Any) -> Any:
    """What the loss reads per token, with gradient to `params`."""

  @abc.abstractmethod
  def loss(self, batch: TrainBatch, values: Any, group_size: int,
           denominator: Optional[Array | float] = None) -> LossResult:
    """`denominator`: the count to divide by instead of this batch's (micro-batch accumulation)."""

  @abc.abstractmethod
  def loss_denominator(self, batch: TrainBatch, values: Any, group_size: int) -> Array:
    """The count `loss` divides by on this batch (no gradient)."""

  def update_teacher(self, teacher_params, student_params, applied: Array):
    return teacher_params


# ----------------------------------------------------------------------------- distillation


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """How the teacher is obtained (MOPD_SPEC.md section 4).

  ema: teacher <- (1 - rate) teacher + rate student after each applied update; trust_region:
  teacher logits = lerp(initial-model logits, current-student logits, rate), both under the
  teacher context; frozen: the initial student; external: another model, never updated.
  """

  mode: str = "ema"
  rate: float = 0.05
  # Encode each group's distinct teacher contexts once and continue every rollout from its
  # context's keys/values (`models.shared_prefix`), instead of one forward over
  # [context | response] per rollout, in batches where some rollouts share a context (K < G).
  # Same values (tests/test_shared_prefix.py); fewer tokens.
  share_contexts: bool = True

  def __post_init__(self):
    fields.check(self, {"mode": fields.Text(lambda: TEACHER_MODES), "rate": fields.UNIT,
                        "share_contexts": fields.Flag()})


@dataclasses.dataclass(frozen=True)
class Distillation(Method):
  """The student matches a teacher that reads the rollout under a context built by
  `peer_preset` (MOPD: peers; SDPO: its own feedback; plain OPD: the prompt alone)."""

  distill: losses.DistillConfig = losses.DistillConfig()
  teacher: TeacherConfig = TeacherConfig()
  needs_external_teacher: bool = False  # the teacher sees only the prompt: it must be another model

  CONFIG_FIELDS: ClassVar[tuple[str, ...]] = tuple(
      f"loss.{f.name}" for f in dataclasses.fields(losses.DistillConfig) if f.name not in ("temperature",
                                                                                          "mismatch_threshold")
  ) + ("teacher.mode", "teacher.rate", "teacher.share_contexts")

  def configured(self, config) -> "Distillation":
    l = config.loss
    paths = {f.name: f"loss.{f.name}" for f in dataclasses.fields(losses.DistillConfig)}
    paths["temperature"] = "sampling.temperature"
    distill = _typed(
        losses.DistillConfig, paths, alpha=l.alpha, top_k=_zero_is_off(l.top_k), use_tail=l.use_tail,
        full_logits=l.full_logits, temperature=config.sampling.temperature, is_clip=_zero_is_off(l.is_clip),
        mismatch=None if l.mismatch == "" else l.mismatch, step_level=l.step_level, loss_agg=l.loss_agg,
        agg_norm=agg_norm(config), chunk_size=l.chunk_size)
    teacher = _typed(TeacherConfig, {f: f"teacher.{f}" for f in ("mode", "rate", "share_contexts")},
                     mode=config.teacher.mode, rate=config.teacher.rate, share_contexts=config.teacher.share_contexts)
    return dataclasses.replace(self, distill=distill, teacher=teacher)

  def check_run(self, config) -> None:
    super().check_run(config)
    if self.needs_external_teacher and config.teacher.mode != "external":
      raise ConfigError(
          f"config.teacher.mode: method {self.name!r} needs teacher.mode='external' (the teacher sees only the prompt)")

  @property
  def uses_teacher_contexts(self) -> bool:
    return True

  @property
  def second_model(self) -> str:
    return "external" if self.teacher.mode == "external" else "copy"

  @property
  def teacher_context_forwards(self) -> int:
    return 2 if self.teacher.mode == "trust_region" else 1

  def no_grad_inputs(self, models, student_params, teacher_params, batch):
    """The teacher's hidden states at the response positions and its unembedding (pairs for
    trust_region: initial model, current student), under the teacher context."""
    if self.teacher.mode == "trust_region":
      h0, w0 = self._teacher_context_hidden(models.student, teacher_params, batch)
      h1, w1 = self._teacher_context_hidden(models.student, student_params, batch)
      hidden, unembed = (h0, h1), (w0, w1)
    else:
      graphdef = models.external_teacher if self.teacher.mode == "external" else models.student
      hidden, unembed = self._teacher_context_hidden(graphdef, teacher_params, batch)
    return lax.stop_gradient(hidden), lax.stop_gradient(unembed)

  def _teacher_context_hidden(self, graphdef, params, batch: TrainBatch) -> tuple[Array, Array]:
    # Shared only where it saves tokens: with K = G slots (every rollout its own context) the
    # per-row forward reads as many tokens and keeps the full-sequence kernel (splash, cuDNN)
    # for all of them, where the shared path's responses use XLA attention.
    if self.teacher.share_contexts and batch.context_slots < batch.group_size:
      return shared_context_hidden(graphdef, params, batch)
    tokens, segments = batching.teacher_rows(batch)
    return response_hidden(graphdef, params, tokens, segments, batch.response_tokens.shape[1])

  def per_token_values(self, models, params, batch, inputs) -> losses.TokenStats:
    t_hidden, t_unembed = inputs
    hidden, unembed = response_hidden(
        models.student, params, batch.student_tokens, batch.student_segments, batch.response_tokens.shape[1])
    logit_fn = losses.trust_region_logit_fn(self.teacher.rate) if self.teacher.mode == "trust_region" else None
    return losses.distill_token_stats(hidden, t_hidden, unembed, t_unembed, batch.response_tokens, self.distill,
                                      logit_fn)

  def _batch(self, batch: TrainBatch) -> losses.DistillBatch:
    return losses.DistillBatch(
        targets=batch.response_tokens, response_mask=batch.response_mask, distill_mask=batch.distill_mask,
        old_logp=batch.sampler_logprobs, step_ids=batch.step_ids if self.distill.step_level else None)

  def loss(self, batch, values, group_size, denominator=None):
    loss, metrics = losses.mopd_loss_from_stats(values, self._batch(batch), self.distill, denominator)
    return LossResult(loss, metrics, jnp.sum(values.teacher_logp * batch.response_mask, axis=-1))

  def loss_denominator(self, batch, values, group_size):
    return losses.mopd_loss_denominator(values, self._batch(batch), self.distill)

  def update_teacher(self, teacher_params, student_params, applied):
    if self.teacher.mode != "ema":
      return teacher_params
    rate = jnp.where(applied, self.teacher.rate, 0.0)  # a skipped update leaves the teacher too
    return jax.tree.map(lambda new, old: new.astype(old.dtype),
                        optax.incremental_update(student_params, teacher_params, rate), teacher_params)


# ----------------------------------------------------------------------------- policy log-prob losses


@flax.struct.dataclass
class PolicyLogProbs:
  """The student's log-prob of each response token [B, R] (with gradient) and, when the
  method keeps a reference model, the reference's (no gradient)."""

  logp: Array
  ref_logp: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class PolicyLogProbMethod(Method):
  """Losses on the student's own per-token log-probs, at the sampling temperature."""

  temperature: float = 1.0
  chunk_size: int = 512

  CONFIG_FIELDS: ClassVar[tuple[str, ...]] = ("loss.chunk_size",)

  def configured(self, config) -> "PolicyLogProbMethod":
    return dataclasses.replace(self, temperature=config.sampling.temperature, chunk_size=config.loss.chunk_size)

  def _logp(self, graphdef, params, batch: TrainBatch) -> Array:
    r = batch.response_tokens.shape[1]
    h, w = response_hidden(graphdef, params, batch.student_tokens, batch.student_segments, r)
    logp, _ = losses.chunked_target_logp(
        h, w, batch.response_tokens, temperature=self.temperature, chunk_size=self.chunk_size)
    return logp

  def no_grad_inputs(self, models, student_params, teacher_params, batch):
    return lax.stop_gradient(self._logp(models.student, teacher_params, batch)) if self.reference_forward else None

  def per_token_values(self, models, params, batch, inputs) -> PolicyLogProbs:
    return PolicyLogProbs(self._logp(models.student, params, batch), inputs)

  @property
  def second_model(self) -> Optional[str]:
    return "copy" if self.reference_forward else None


@dataclasses.dataclass(frozen=True)
class GRPO(PolicyLogProbMethod):
  grpo: losses.GRPOConfig = losses.GRPOConfig()

  CONFIG_FIELDS: ClassVar[tuple[str, ...]] = PolicyLogProbMethod.CONFIG_FIELDS + tuple(
      f"grpo.{f.name}" for f in dataclasses.fields(losses.GRPOConfig) if f.name not in ("loss_agg", "agg_norm"))

  def configured(self, config) -> "GRPO":
    paths = {f.name: f"grpo.{f.name}" for f in dataclasses.fields(losses.GRPOConfig)}
    paths.update(loss_agg="loss.loss_agg", agg_norm="loss.agg_norm")
    g = config.grpo
    options = _typed(losses.GRPOConfig, paths, clip_eps=g.clip_eps, clip_high=g.clip_high,
                     clip_c=_zero_is_off(g.clip_c), kl_coef=g.kl_coef, use_kl=g.use_kl,
                     normalize_std=g.normalize_std, loss_agg=config.loss.loss_agg, agg_norm=agg_norm(config))
    return dataclasses.replace(super().configured(config), grpo=options)

  @property
  def reference_forward(self) -> bool:
    return self.grpo.use_kl

  def _batch(self, batch: TrainBatch, values: PolicyLogProbs, group_size: int) -> losses.GRPOBatch:
    adv = losses.group_advantages(batch.rewards.reshape(-1, group_size), normalize_std=self.grpo.normalize_std)
    return losses.GRPOBatch(old_logp=batch.sampler_logprobs, advantages=adv.reshape(-1),
                            response_mask=batch.response_mask, ref_logp=values.ref_logp)

  def loss(self, batch, values, group_size, denominator=None):
    return LossResult(*losses.grpo_loss(values.logp, self._batch(batch, values, group_size), self.grpo, denominator),
                      None)

  def loss_denominator(self, batch, values, group_size):
    return lax.stop_gradient(losses.grpo_loss_denominator(self._batch(batch, values, group_size), self.grpo))


@dataclasses.dataclass(frozen=True)
class PairwisePreference(PolicyLogProbMethod):
  """On-policy pairs from each group: its j-th best rollout against its j-th worst. A subclass
  keeps its options (a dataclass with `max_pairs_per_group`) in the field named `SECTION`, read
  from the config section of that name."""

  SECTION: ClassVar[str] = ""
  OPTIONS: ClassVar[type] = type(None)

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    return PolicyLogProbMethod.CONFIG_FIELDS + tuple(f"{cls.SECTION}.{f.name}" for f in dataclasses.fields(cls.OPTIONS))

  def configured(self, config) -> "PairwisePreference":
    paths = {f.name: f"{self.SECTION}.{f.name}" for f in dataclasses.fields(self.OPTIONS)}
    options = _typed(self.OPTIONS, paths, **dict(config[self.SECTION]))
    return dataclasses.replace(super().configured(config), **{self.SECTION: options})

  def options(self) -> Any:
    return getattr(self, self.SECTION)

  @abc.abstractmethod
  def pair_loss(self, logp: Array, pairs: losses.PreferenceBatch, denominator):
    """(loss, metrics) of the pairs."""

  def learning_rate(self, optim) -> float:
    return optim.preference_lr  # the authors ran DPO and SimPO at 1e-6, MOPD and GRPO at 1e-5

  def _pairs(self, batch: TrainBatch, values: PolicyLogProbs, group_size: int) -> losses.PreferenceBatch:
    chosen, rejected, mask = losses.preference_pairs(batch.rewards, group_size, self.options().max_pairs_per_group)
    ref_seq = None if values.ref_logp is None else losses.sequence_logp(values.ref_logp, batch.response_mask)
    return losses.PreferenceBatch(response_mask=batch.response_mask, chosen=chosen, rejected=rejected,
                                  pair_mask=mask, ref_seq_logp=ref_seq)

  def loss(self, batch, values, group_size, denominator=None):
    return LossResult(*self.pair_loss(values.logp, self._pairs(batch, values, group_size), denominator), None)

  def loss_denominator(self, batch, values, group_size):
    return lax.stop_gradient(losses.pair_loss_denominator(self._pairs(batch, values, group_size)))


@dataclasses.dataclass(frozen=True)
class DPO(PairwisePreference):
  dpo: losses.DPOConfig = losses.DPOConfig()

  SECTION: ClassVar[str] = "dpo"
  OPTIONS: ClassVar[type] = losses.DPOConfig

  @property
  def reference_forward(self) -> bool:
    return True

  def pair_loss(self, logp, pairs, denominator):
    return losses.dpo_loss(logp, pairs, self.dpo, denominator)


@dataclasses.dataclass(frozen=True)
class SimPO(PairwisePreference):
  simpo: losses.SimPOConfig = losses.SimPOConfig()

  SECTION: ClassVar[str] = "simpo"
  OPTIONS: ClassVar[type] = losses.SimPOConfig

  def pair_loss(self, logp, pairs, denominator):
    return losses.simpo_loss(logp, pairs, self.simpo, denominator)


@dataclasses.dataclass(frozen=True)
class VerifiedSFT(PolicyLogProbMethod):
  """Token-mean NLL on the verified successes only."""

  def _batch(self, batch: TrainBatch) -> losses.SFTBatch:
    return losses.SFTBatch(batch.response_mask, batch.success)

  def loss(self, batch, values, group_size, denominator=None):
    return LossResult(*losses.sft_loss(values.logp, self._batch(batch), losses.SFTConfig(), denominator), None)

  def loss_denominator(self, batch, values, group_size):
    return lax.stop_gradient(losses.sft_loss_denominator(self._batch(batch)))


# ----------------------------------------------------------------------------- the registry

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"method {method.name!r} is already registered")
  METHODS[method.name] = method
  return method


def get(name: str) -> Method:
  """The registered method `name` with default options."""
  if name not in METHODS:
    raise ConfigError(f"config.method: unknown method {name!r}; known: {sorted(METHODS)}")
  return METHODS[name]


def from_config(config) -> Method:
  """The configuration's method with its options; a bad option raises `ConfigError`."""
  return get(config.method).configured(config)


def check_every_method_options(config) -> None:
  """Read every registered method's options from `config`, so a bad option is reported even
  when another method runs (as every other field is)."""
  for method in METHODS.values():
    method.configured(config)


def config_fields() -> frozenset[str]:
  """The configuration fields the registered methods read and validate."""
  return frozenset(f for m in METHODS.values() for f in type(m).config_fields())


register(Distillation("mopd", "mopd_2s1f", needs_peers=True))
register(Distillation("positive_only", "positive_only", needs_peers=True))
register(Distillation("sdpo", "sdpo", needs_peers=True))
register(Distillation("plain_opd", "plain_opd", needs_external_teacher=True))
# Controls of the peer-conditioning claim (MOPD_SPEC.md section 6).
register(Distillation("random_peer", "random_peer", needs_peers=True))
register(Distillation("unrelated_prompt", "unrelated_prompt", needs_peers=True))
register(Distillation("success_only_matched", "success_only_matched", needs_peers=True))
register(GRPO("grpo", needs_peers=True))
register(DPO("dpo", needs_peers=True))
register(SimPO("simpo", needs_peers=True))
register(VerifiedSFT("verified_sft"))
