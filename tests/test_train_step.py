"""The jitted train step: every method runs, sharded == single device, EMA exact, guards."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mopd_jax import losses, sharding
from mopd_jax.batching import RolloutRows, build_train_batch
from mopd_jax.models import init_model, tiny_config
from mopd_jax.train_step import (
    StepConfig, TeacherState, group_alignment_auc, init_teacher_state, init_train_state, jit_train_step,
    make_optimizer, make_train_step)

G = 4


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
    "trust_region": StepConfig(group_size=G, teacher_mode="trust_region"),
    "frozen_full_vocab_fkl": StepConfig(
        group_size=G, teacher_mode="frozen", distill=losses.DistillConfig(alpha=0.0, top_k=None)),
    "sampled_token": StepConfig(group_size=G, distill=losses.DistillConfig(alpha=1.0, full_logits=False)),
    "grpo_kl": StepConfig(loss="grpo", group_size=G, grpo_use_kl=True),
    "dpo": StepConfig(loss="dpo", group_size=G),
    "simpo": StepConfig(loss="simpo", group_size=G),
    "sft": StepConfig(loss="sft", group_size=G),
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
  step_cfg = StepConfig(group_size=G, teacher_mode="frozen", distill=losses.DistillConfig(is_clip=None))
  cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  batch = _batch(cfg, teacher_same_as_student=True)
  # Same bucket for both sides so the teacher sees exactly the student's rows.
  batch = batch.replace(teacher_tokens=batch.student_tokens, teacher_segments=batch.student_segments)
  step = jax.jit(make_train_step(graphdef, opt, step_cfg))
  _, _, metrics = step(state, teacher, batch, jax.random.key(0))
  assert abs(float(metrics.loss)) <= 1e-6
  assert float(metrics.grad_norm) <= 1e-6


def test_ema_teacher_update_is_exact():
  step_cfg = StepConfig(group_size=G, teacher_rate=0.25)
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
  step_cfg = StepConfig(loss="sft", group_size=G)
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
  run = jit_train_step(step_fn, mesh, state2, teacher2)
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
