"""The jitted train step: every method runs, sharded == single device, EMA exact, guards,
micro-batches == the whole batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mopd_jax import config_lib, losses, methods, sharding
from mopd_jax.batching import RolloutRows, TrainBatch, build_train_batch
from mopd_jax.models import init_model, tiny_config
from mopd_jax.train_step import (
    StepConfig, TeacherState, group_alignment_auc, init_teacher_state, init_train_state, jit_train_step,
    make_optimizer, make_train_step, num_micro_batches)

G = 4


def distill_step(teacher_mode="ema", teacher_rate=0.05, micro_batch_rows=0, **options) -> StepConfig:
  """MOPD's step with these teacher and `losses.DistillConfig` options."""
  method = dataclasses.replace(methods.get("mopd"), teacher=methods.TeacherConfig(teacher_mode, teacher_rate),
                               distill=losses.DistillConfig(**options))
  return StepConfig(method=method, group_size=G, micro_batch_rows=micro_batch_rows)


def linear_optimizer() -> optax.GradientTransformation:
  """Clip + SGD: the update is linear in the gradient, so equal params mean equal gradients
  (Adam's first step ~ lr * sign(g) would hide a wrongly scaled gradient)."""
  return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), 10)


def baseline_step(name, micro_batch_rows=0, **options) -> StepConfig:
  """A registered baseline's step with its typed options replaced (e.g. grpo=GRPOConfig(...))."""
  return StepConfig(method=dataclasses.replace(methods.get(name), **options), group_size=G,
                    micro_batch_rows=micro_batch_rows)


def _batch(cfg, prompts=2, seed=0, teacher_same_as_student=False):
  rng = np.random.RandomState(seed)
  n = prompts * G
  student = [list(rng.randint(1, cfg.vocab_size, rng.randint(3, 8))) for _ in range(prompts) for _ in range(G)]
  teacher = student if teacher_same_as_student else [
      list(rng.randint(1, cfg.vocab_size, rng.randint(5, 14))) for _ in range(n)]
  responses = [list(rng.randint(1, cfg.vocab_size, rng.randint(2, 10))) for _ in range(n)]
  rewards = rng.randint(0, 2, n).astype(float)
  rows = RolloutRows(
      student_prompts=student, teacher_prompts=teacher, responses=responses,
      sampler_logprobs=[list(-rng.rand(len(r)) * 3) for r in responses], distill_mask=[1.0] * n,
      rewards=list(rewards), success=list(rewards > 0.5), group_ids=[i // G for i in range(n)])
  return build_train_batch(rows, pad_id=0, prompt_buckets=(8, 16), response_buckets=(16,))


def _setup(step_cfg, family="llama", lr=1e-2):
  cfg = tiny_config(family)
  graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
  opt, lr_fn = make_optimizer(lr)
  state = init_train_state(params, opt)
  teacher = init_teacher_state(step_cfg, params)
  return cfg, graphdef, opt, lr_fn, state, teacher


METHODS = {
    "mopd_ema": StepConfig(group_size=G),
    "trust_region": distill_step("trust_region"),
    "frozen_full_vocab_fkl": distill_step("frozen", alpha=0.0, top_k=None),
    "sampled_token": distill_step(alpha=1.0, full_logits=False),
    "grpo_kl": baseline_step("grpo", grpo=losses.GRPOConfig(use_kl=True)),
    "dpo": baseline_step("dpo"),
    "simpo": baseline_step("simpo"),
    "sft": baseline_step("verified_sft"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_updates_with_finite_metrics(name):
  step_cfg = METHODS[name]
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(make_train_step(graphdef, opt, step_cfg, learning_rate_fn=lr_fn))
  state, teacher, metrics = step(state, teacher, _batch(cfg), jax.random.key(0))
  assert np.isfinite(float(metrics.loss)) and np.isfinite(float(metrics.grad_norm))
  assert float(metrics.update_applied) == 1.0 and int(state.step) == 1
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(np.asarray(a) != b), state.params, before))
  assert any(changed)


def test_teacher_equal_to_student_on_same_context_gives_zero_loss_and_gradient():
  step_cfg = distill_step("frozen", is_clip=None)
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  batch = _batch(cfg, teacher_same_as_student=True)
  # Same bucket for both sides, so the teacher sees exactly the student's rows.
  assert batch.teacher_prompt_len == batch.student_prompt_len
  step = jax.jit(make_train_step(graphdef, opt, step_cfg))
  _, _, metrics = step(state, teacher, batch, jax.random.key(0))
  assert abs(float(metrics.loss)) <= 1e-6
  assert float(metrics.grad_norm) <= 1e-6


def test_ema_teacher_update_is_exact():
  step_cfg = distill_step(teacher_rate=0.25)
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  teacher = TeacherState(params=jax.tree.map(lambda x: x + 0.5, teacher.params))
  old_teacher = jax.tree.map(np.asarray, teacher.params)
  step = jax.jit(make_train_step(graphdef, opt, step_cfg))
  state, teacher, _ = step(state, teacher, _batch(cfg), jax.random.key(0))
  expected = jax.tree.map(lambda t, s: (np.float32(0.75) * t + np.float32(0.25) * np.asarray(s)),
                          old_teacher, state.params)
  # Exact up to XLA's fused multiply-add: at most one float32 ulp.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1.2e-7, atol=0), teacher.params, expected)


def test_non_finite_loss_skips_update_and_keeps_state():
  step_cfg = baseline_step("verified_sft")
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  poisoned = jax.tree.map(lambda x: x, state.params)
  poisoned["norm"]["scale"].value = poisoned["norm"]["scale"].value.at[0].set(jnp.nan)
  state = state.replace(params=poisoned)
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(make_train_step(graphdef, opt, step_cfg))
  batch = _batch(cfg)
  batch = batch.replace(success=jnp.ones_like(batch.success))
  new_state, _, metrics = step(state, teacher, batch, jax.random.key(0))
  assert float(metrics.update_applied) == 0.0 and int(new_state.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new_state.params, before)


def test_sharded_update_equals_single_device_and_compiles_once():
  step_cfg = StepConfig(group_size=G)
  # Adam's first step is ~lr * sign(g): a modest lr keeps float reassociation noise on
  # near-zero gradients well inside the tolerance.
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg, family="qwen3", lr=1e-3)
  batch = _batch(cfg, prompts=2)
  step_fn = make_train_step(graphdef, opt, step_cfg)
  single_state, single_teacher, single_metrics = jax.jit(step_fn)(state, teacher, batch, jax.random.key(0))

  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  _, _, _, _, state2, teacher2 = _setup(step_cfg, family="qwen3", lr=1e-3)
  run = jit_train_step(step_fn, mesh, state2, teacher2, opt)
  state2 = jax.device_put(state2, run.state_shardings)
  teacher2 = jax.device_put(teacher2, run.teacher_shardings)
  state2, teacher2, metrics2 = run(state2, teacher2, batch, jax.random.key(0))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  jax.tree.map(close, state2.params, single_state.params)
  jax.tree.map(close, teacher2.params, single_teacher.params)
  close(metrics2.loss, single_metrics.loss)
  for seed in range(1, 4):  # same buckets: no new compilation
    state2, teacher2, _ = run(state2, teacher2, _batch(cfg, prompts=2, seed=seed), jax.random.key(seed))
  assert run.jitted._cache_size() == 1


def test_group_alignment_auc():
  scores = jnp.array([3.0, 1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  success = jnp.array([1, 0, 1, 0, 1, 1, 1, 1], jnp.float32)
  auc, n = group_alignment_auc(scores, success, 4)
  assert float(auc) == 1.0 and float(n) == 1.0  # second group has one outcome only
  auc, _ = group_alignment_auc(jnp.array([0.0, 1.0, 1.0, 2.0]), jnp.array([1, 0, 1, 0], jnp.float32), 4)
  # success scores {0, 1} vs failure scores {1, 2}: pairs 0<1, 0<2, 1=1 (0.5), 1<2 -> 0.5/4
  assert abs(float(auc) - 0.125) < 1e-7


# ------------------------------------------------------------------ micro-batches

# One group per line. Micro-batches of one group differ in response tokens (38, 8, 40, 13),
# sequences kept by distill_mask (4, 1, 4, 4) and preference pairs (2, 0, 1, 2 with two pairs
# per group), so a per-micro-batch normaliser would be visibly wrong.
_UNEVEN_LENGTHS = ((14, 12, 3, 9), (2, 3, 1, 2), (8, 16, 5, 11), (4, 1, 6, 2))
_UNEVEN_REWARDS = ((1, 0, 1, 0), (0, 0, 0, 0), (0, 1, 0, 0), (1, 1, 0, 0))
# Backend optimisations off: compiles about twice as fast; both sides of a comparison compile alike.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _uneven_batch(cfg, seed=0):
  rng = np.random.RandomState(seed)
  n = len(_UNEVEN_LENGTHS) * G
  responses = [list(rng.randint(1, cfg.vocab_size, k)) for lengths in _UNEVEN_LENGTHS for k in lengths]
  rewards = np.asarray(_UNEVEN_REWARDS, np.float32).reshape(-1)
  distill = [0.0 if 4 <= i < 7 else 1.0 for i in range(n)]
  rows = RolloutRows(
      student_prompts=[list(rng.randint(1, cfg.vocab_size, rng.randint(3, 8))) for _ in range(n)],
      teacher_prompts=[list(rng.randint(1, cfg.vocab_size, rng.randint(5, 14))) for _ in range(n)],
      responses=responses,
      # Near the untrained model's log(1 / V): the IS cap and the mismatch mask both act on some tokens.
      sampler_logprobs=[list(np.log(1.0 / cfg.vocab_size) + 0.5 * rng.randn(len(r))) for r in responses],
      distill_mask=distill, rewards=list(rewards), success=list(rewards > 0.5), group_ids=[i // G for i in range(n)])
  return build_train_batch(rows, pad_id=0, prompt_buckets=(8, 16), response_buckets=(16,))


def _only_rows(batch: TrainBatch, rows: slice) -> TrainBatch:
  """The batch with every row outside `rows` contributing nothing (no tokens, no pairs): its
  loss is the loss of `rows` alone, normalised over them only."""
  keep = np.zeros(batch.rewards.shape[0], np.float32)
  keep[rows] = 1.0
  return batch.replace(response_mask=batch.response_mask * keep[:, None], distill_mask=batch.distill_mask * keep,
                       rewards=batch.rewards * keep, success=batch.success * keep)


MICRO_METHODS = {
    "mopd_ema_token_mean": distill_step(teacher_rate=0.25),
    # The mismatch mask's token count depends on the student's log-probs: known after the scan only.
    "mopd_ema_seq_mean_mismatch_mask": distill_step(teacher_rate=0.25, loss_agg="seq-mean-token-mean", mismatch="mask"),
    # A constant divides the rows' token sums (verl's agg_loss): the accumulated count is 1.
    "mopd_ema_seq_sum_norm": distill_step(teacher_rate=0.25, loss_agg="seq-mean-token-sum-norm", agg_norm=24.0),
    "grpo_kl": baseline_step("grpo", grpo=losses.GRPOConfig(use_kl=True)),
    "dpo": baseline_step("dpo", dpo=losses.DPOConfig(max_pairs_per_group=2)),
}


@pytest.mark.parametrize("name", list(MICRO_METHODS))
def test_micro_batches_give_the_whole_batch_update(name):
  whole_cfg = MICRO_METHODS[name]
  micro_cfg = dataclasses.replace(whole_cfg, micro_batch_rows=G)
  cfg, graphdef, _, _, state, teacher = _setup(whole_cfg)
  # SGD after the clip: the update is linear in the gradient, so equal params mean equal
  # gradients (Adam's first step ~ lr * sign(g) would hide a wrongly scaled gradient).
  opt = linear_optimizer()
  state = init_train_state(state.params, opt)
  # A teacher / reference unlike the student, randomly (so per-token losses vary between micro-batches
  # and per-micro-batch normalisation would be visibly wrong): the losses and the EMA update are not trivial.
  teacher = TeacherState(params=jax.tree.map(
      lambda x: x + 0.01 + 0.02 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), teacher.params))
  batch = _uneven_batch(cfg)
  rows = batch.rewards.shape[0]
  assert num_micro_batches(micro_cfg, rows) == 4
  run = lambda step_cfg: jax.jit(make_train_step(graphdef, opt, step_cfg)).lower(
      state, teacher, batch, jax.random.key(0)).compile(_FAST_COMPILE)
  whole, micro = run(whole_cfg), run(micro_cfg)
  s0, t0, m0 = whole(state, teacher, batch, jax.random.key(0))
  s1, t1, m1 = micro(state, teacher, batch, jax.random.key(0))

  assert float(m1.update_applied) == 1.0 and int(s1.step) == 1
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  jax.tree.map(close, s1.params, s0.params)
  if teacher.params is not None:
    jax.tree.map(close, t1.params, t0.params)
  np.testing.assert_allclose(float(m1.loss), float(m0.loss), rtol=1e-6)
  np.testing.assert_allclose(float(m1.grad_norm), float(m0.grad_norm), rtol=1e-6)
  # Every method metric is the loss function's on the whole batch's per-token values.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6), m1, m0)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(state.params)))
  assert moved > 1e-3  # the update is not trivially small next to the tolerance

  # The mean of the micro-batches' own losses (each normalised over itself) is far off.
  parts = [float(whole(state, teacher, _only_rows(batch, slice(i, i + G)), jax.random.key(0))[2].loss)
           for i in range(0, rows, G)]
  assert abs(np.mean(parts) / float(m0.loss) - 1.0) > 1e-2, (parts, float(m0.loss))


def _abstract_batch(rows: int, prompt: int = 32, response: int = 224) -> TrainBatch:
  s = jax.ShapeDtypeStruct
  tokens, per_token = s((rows, prompt + response), jnp.int32), s((rows, response), jnp.float32)
  per_row = s((rows,), jnp.float32)
  contexts = s((rows, prompt), jnp.int32)  # K = G: every rollout its own teacher context
  return TrainBatch(
      student_tokens=tokens, student_segments=tokens, teacher_contexts=contexts, teacher_context_segments=contexts,
      teacher_context_index=s((rows,), jnp.int32), response_tokens=s((rows, response), jnp.int32),
      response_mask=per_token, distill_mask=per_row, sampler_logprobs=per_token, step_ids=s((rows, response), jnp.int32),
      rewards=per_row, success=per_row, group_ids=s((rows,), jnp.int32), group_size=G)


def test_micro_batch_memory_grows_with_the_micro_batch_not_the_batch():
  """Compiled temporaries of the MOPD step on long rows (activations dominate the tiny model's
  parameters): batch 4G in micro-batches of G needs about what batch G does without them."""
  step_cfg = StepConfig(group_size=G)
  _, graphdef, opt, _, state, teacher = _setup(step_cfg)

  def temp_bytes(rows: int, micro_batch_rows: int) -> int:
    cfg = dataclasses.replace(step_cfg, micro_batch_rows=micro_batch_rows)
    compiled = jax.jit(make_train_step(graphdef, opt, cfg)).lower(
        state, teacher, _abstract_batch(rows), jax.random.key(0)).compile(_FAST_COMPILE)
    memory = compiled.memory_analysis()
    if memory is None:
      pytest.skip("this backend has no memory_analysis")
    return memory.temp_size_in_bytes

  whole, micro, small = temp_bytes(4 * G, 0), temp_bytes(4 * G, G), temp_bytes(G, 0)
  assert micro < 0.4 * whole, (micro, whole)  # measured: 45.7 vs 180.6 MiB
  assert micro < 1.15 * small, (micro, small)  # measured: 45.7 vs 45.0 MiB


def test_micro_batch_rows_validation():
  with pytest.raises(ValueError, match="micro_batch_rows"):
    StepConfig(group_size=G, micro_batch_rows=G + 1)  # would split a group
  cfg = StepConfig(group_size=G, micro_batch_rows=2 * G)
  assert num_micro_batches(cfg, 8 * G) == 4 and num_micro_batches(cfg, 2 * G) == 1
  assert num_micro_batches(StepConfig(group_size=G), 8 * G) == 1
  with pytest.raises(ValueError, match="does not divide the batch's 12 rows"):
    num_micro_batches(cfg, 3 * G)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
  assert num_micro_batches(StepConfig(group_size=G, micro_batch_rows=4 * G), 8 * G, mesh) == 2
  with pytest.raises(ValueError, match="data x fsdp mesh size 8"):
    num_micro_batches(StepConfig(group_size=G, micro_batch_rows=G), 8 * G, mesh)

  config = config_lib.base_config()  # group size 8, 32 prompts per step: 256 rows
  config_lib.validate(config, num_devices=8)
  for micro, devices, what in ((12, 8, "multiple of sampling.group_size"), (24, 8, "does not divide the 256 rows"),
                               (8, 16, "data x fsdp mesh size 16"), (-8, 8, "int >= 0")):
    config.train.micro_batch_rows = micro
    with pytest.raises(config_lib.ConfigError, match=rf"config\.train\.micro_batch_rows: .*{what}"):
      config_lib.validate(config, num_devices=devices)
  config.train.micro_batch_rows = 64
  config_lib.validate(config, num_devices=8)


@pytest.mark.slow
def test_sharded_micro_batches_equal_the_whole_batch_and_stay_sharded():
  """On a data x fsdp mesh each micro-batch's rows are spread over the batch shards: same
  update as the single-device whole batch, and per-device temporaries shrink like the
  micro-batch (without the sharding constraint on the split batch they did not: 52 vs 13 MiB)."""
  step_cfg = distill_step(teacher_rate=0.25)
  micro_cfg = dataclasses.replace(step_cfg, micro_batch_rows=2 * G)
  cfg, graphdef, _, _, state, teacher = _setup(step_cfg, family="qwen3")
  opt = linear_optimizer()
  params = state.params
  fresh = lambda: (init_train_state(jax.tree.map(jnp.copy, params), opt),
                   TeacherState(params=jax.tree.map(lambda x: x + 0.01, params)))
  batch = _uneven_batch(cfg)
  state, teacher = fresh()
  s0, t0, m0 = jax.jit(make_train_step(graphdef, opt, step_cfg))(state, teacher, batch, jax.random.key(0))

  mesh = sharding.make_mesh(sharding.MeshConfig(4, 2, 1))
  state, teacher = fresh()
  run = jit_train_step(make_train_step(graphdef, opt, micro_cfg, mesh=mesh), mesh, state, teacher, opt)
  state, teacher = jax.device_put(state, run.state_shardings), jax.device_put(teacher, run.teacher_shardings)
  s1, t1, m1 = run(state, teacher, batch, jax.random.key(0))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  jax.tree.map(close, s1.params, s0.params)
  jax.tree.map(close, t1.params, t0.params)
  np.testing.assert_allclose(float(m1.loss), float(m0.loss), rtol=1e-5)  # sums over shards: another order

  def temp_bytes(step_cfg: StepConfig) -> int:
    state, teacher = fresh()
    jitted = jit_train_step(make_train_step(graphdef, opt, step_cfg, mesh=mesh), mesh, state, teacher, opt).jitted
    rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(
        mesh, len(x.shape))), _abstract_batch(8 * G))
    memory = jitted.lower(state, teacher, rows, jax.random.key(0)).compile(_FAST_COMPILE).memory_analysis()
    if memory is None:
      pytest.skip("this backend has no memory_analysis")
    return memory.temp_size_in_bytes

  whole, micro = temp_bytes(step_cfg), temp_bytes(micro_cfg)
  assert micro < 0.4 * whole, (micro, whole)  # measured: 13.0 vs 49.8 MiB per device


def test_activation_and_cache_axes_come_from_the_one_rules_table():
  """Batches, caches and the splash kernel's specs read `sharding.DEFAULT_RULES`; a rules table
  that moves the rows (or the heads) moves all of them."""
  from mopd_jax.models import splash

  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  P = jax.sharding.PartitionSpec
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.cache_sharding(mesh, num_kv_heads=4).spec == P(None, ("data", "fsdp"), "tensor", None, None)
  assert sharding.cache_sharding(mesh, num_kv_heads=3).spec[2] is None  # 3 heads do not split over 2
  assert splash._specs(mesh, batch=8, heads=4, kv_heads=2) == (P(("data", "fsdp"), None, "tensor", None),
                                                                P(("data", "fsdp"), None))
  rules = tuple((n, "data" if n == "activation_batch" else None if n == "activation_heads" else a)
                for n, a in sharding.DEFAULT_RULES)
  assert sharding.batch_sharding(mesh, 2, rules).spec == P("data", None)
  assert sharding.cache_sharding(mesh, 4, rules).spec == P(None, "data", None, None, None)
  assert sharding.batch_spec(1) == P(("data", "fsdp"))
