"""Teacher contexts encoded once per group (`models.shared_prefix`, `teacher.share_contexts`)
give the per-row `[context | response]` forward's values: model hidden states, every teacher
mode's inputs to the loss, and whole train steps (micro-batched, sharded)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mopd_jax import batching, methods, sharding
from mopd_jax.batching import RolloutRows, build_train_batch
from mopd_jax.models import init_model, positions_from_segments, tiny_config
from mopd_jax.models.shared_prefix import forward_with_shared_prefixes
from mopd_jax.train_step import (
    StepConfig, init_teacher_state, init_train_state, jit_train_step, make_train_step)

G = 4
TOL = dict(rtol=2e-5, atol=2e-5)


def _left_padded(seqs, width):
  tokens, segments = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, width - len(s):], segments[i, width - len(s):] = s, 1
  return tokens, segments


def _right_padded(seqs, width):
  tokens, segments = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], segments[i, :len(s)] = s, 1
  return tokens, segments


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"scan_layers": False}), ("qwen3", {"attention_chunk": 3}),
])
def test_forward_equals_one_forward_per_row(family, overrides):
  """Left-padded prefixes of different lengths (one of a single token), right-padded suffixes
  (one empty, one filling its bucket), K = 3 prefixes per group, rows picking any of them."""
  cfg = dataclasses.replace(tiny_config(family), **overrides)
  model = init_model(cfg, seed=1)
  rng = np.random.default_rng(0)
  groups, k, lc, t = 2, 3, 11, 7
  prefixes = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (11, 1, 6, 4, 9, 2)]
  suffixes = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (7, 0, 3, 5, 1, 6, 7, 2)]
  prefix_of = np.array([2, 0, 0, 1, 1, 1, 0, 2], np.int32)
  p_tok, p_seg = _left_padded(prefixes, lc)
  s_tok, s_seg = _right_padded(suffixes, t)
  out = jax.jit(lambda *a: forward_with_shared_prefixes(model, *a, group_size=G))(p_tok, p_seg, s_tok, s_seg, prefix_of)
  assert out.suffix_hidden.shape == (groups * G, t, cfg.hidden_size)
  for r in range(groups * G):
    c = (r // G) * k + prefix_of[r]
    row = np.concatenate([p_tok[c], s_tok[r]])[None]
    seg = np.concatenate([p_seg[c], s_seg[r]])[None]
    ref = model(jnp.asarray(row), positions_from_segments(jnp.asarray(seg)), jnp.asarray(seg), return_logits=False).hidden[0]
    n = len(suffixes[r])
    np.testing.assert_allclose(out.suffix_hidden[r, :n], ref[lc:lc + n], **TOL, err_msg=f"row {r}")
    np.testing.assert_allclose(out.prefix_last_hidden[r], ref[lc - 1], **TOL, err_msg=f"row {r}")


def test_layout_errors_name_the_problem():
  cfg = tiny_config("llama")
  model = init_model(cfg)
  z = lambda *shape: jnp.zeros(shape, jnp.int32)
  with pytest.raises(ValueError, match="not whole groups of 4"):
    forward_with_shared_prefixes(model, z(2, 4), z(2, 4), z(6, 3), z(6, 3), z(6), group_size=G)
  with pytest.raises(ValueError, match="5 prefixes are not the same number per group for 2 groups"):
    forward_with_shared_prefixes(model, z(5, 4), z(5, 4), z(8, 3), z(8, 3), z(8), group_size=G)


# ----------------------------------------------------------------------------- batching


def _rows(cfg, contexts_per_group, seed=0, groups=3):
  """Groups of G rollouts whose teacher prompts repeat like a 2S1F group's: `contexts_per_group[p]`
  distinct prompts in group p, rows assigned round-robin; random student prompts and responses."""
  rng = np.random.default_rng(seed)
  tokens = lambda lo, hi: rng.integers(1, cfg.vocab_size, rng.integers(lo, hi)).tolist()
  teacher = []
  for p in range(groups):
    distinct = [tokens(2, 15) for _ in range(contexts_per_group[p])]
    teacher += [distinct[i % len(distinct)] for i in range(G)]
  n = groups * G
  responses = [tokens(1, 12) for _ in range(n - 1)] + [tokens(16, 17)]  # one fills the response bucket
  rewards = rng.integers(0, 2, n).astype(float)
  return RolloutRows(
      student_prompts=[tokens(2, 8) for _ in range(n)], teacher_prompts=teacher, responses=responses,
      sampler_logprobs=[(np.log(1 / cfg.vocab_size) + 0.3 * rng.standard_normal(len(r))).tolist() for r in responses],
      distill_mask=[1.0] * n, rewards=list(rewards), success=list(rewards > 0.5),
      group_ids=[i // G for i in range(n)])


def test_context_table_holds_each_groups_distinct_contexts_once():
  rows = _rows(tiny_config("llama"), (1, 3, 2))
  batch = build_train_batch(rows, pad_id=0, prompt_buckets=(8, 16), response_buckets=(16,))
  assert batch.group_size == G and batch.teacher_contexts.shape == (3 * 3, 16)  # K = 3: the most varied group
  tokens, segments = jax.jit(batching.teacher_rows)(batch)
  for r in range(3 * G):  # every row's rebuilt teacher row is [its own teacher prompt | its response]
    prompt, response = rows.teacher_prompts[r], rows.responses[r]
    assert tokens[r, 16 - len(prompt):16].tolist() == prompt and tokens[r, 16:16 + len(response)].tolist() == response
    assert segments[r].sum() == len(prompt) + len(response)
  assert batch.teacher_context_index.tolist() == [0, 0, 0, 0, 0, 1, 2, 0, 0, 1, 0, 1]
  # Unused slots hold a one-token placeholder, never an empty row.
  assert np.asarray(batch.teacher_context_segments).sum(1).min() == 1
  # Shapes every process agrees on: at_least raises K; a multiple keeps tables divisible.
  assert build_train_batch(rows, pad_id=0, prompt_buckets=(16,), response_buckets=(16,),
                           at_least=(0, 0, 0, 4)).teacher_contexts.shape[0] == 3 * 4
  assert build_train_batch(rows, pad_id=0, prompt_buckets=(16,), response_buckets=(16,),
                           context_slot_multiple=2).teacher_contexts.shape[0] == 3 * 4
  assert [batching.context_slots(n, 8, m) for n, m in ((1, 1), (3, 1), (5, 1), (1, 2), (3, 4), (9, 1))] == [
      1, 3, 5, 2, 4, 8]


def test_batching_refuses_groups_it_cannot_lay_out():
  rows = _rows(tiny_config("llama"), (1, 2, 2))
  with pytest.raises(ValueError, match="consecutive rows of one size"):
    build_train_batch(dataclasses.replace(rows, group_ids=[0] * 5 + [1] * 3 + [2] * 4), pad_id=0)
  with pytest.raises(ValueError, match="must be consecutive"):
    build_train_batch(dataclasses.replace(rows, group_ids=[0] * 4 + [1] * 4 + [0] * 4), pad_id=0)
  with pytest.raises(ValueError, match="every teacher prompt needs at least one token"):
    build_train_batch(dataclasses.replace(rows, teacher_prompts=[[]] + list(rows.teacher_prompts[1:])), pad_id=0)
  with pytest.raises(ValueError, match="group size 8 is not a multiple of 3"):
    batching.context_slots(2, 8, 3)


# ----------------------------------------------------------------------------- the method and the step


def _method(mode, share):
  return dataclasses.replace(methods.get("mopd"), teacher=methods.TeacherConfig(mode, 0.25, share_contexts=share))


def _models(mode):
  cfg = tiny_config("qwen3")
  graphdef, params = nnx.split(init_model(cfg, seed=0), nnx.Param)
  teacher_def, external = None, None
  if mode == "external":  # another (wider) model over the same vocabulary
    teacher_def, external = nnx.split(init_model(dataclasses.replace(cfg, intermediate_size=96), seed=3), nnx.Param)
  return cfg, graphdef, params, teacher_def, external


@pytest.fixture
def shared_calls(monkeypatch):
  """How many times the shared-context forward was traced (so an equality cannot come from
  both sides taking the per-row path)."""
  calls = []
  real = methods.shared_context_hidden
  monkeypatch.setattr(methods, "shared_context_hidden", lambda *a: calls.append(1) or real(*a))
  return calls


@pytest.mark.parametrize("mode", methods.TEACHER_MODES)
def test_every_teacher_mode_reads_the_same_teacher_values(mode, shared_calls):
  cfg, graphdef, params, teacher_def, external = _models(mode)
  batch = jax.tree.map(jnp.asarray, build_train_batch(_rows(cfg, (1, 3, 2)), pad_id=0, prompt_buckets=(8, 16),
                                                      response_buckets=(16,)))
  assert batch.context_slots == 3
  models = methods.Models(graphdef, teacher_def)
  shifted = jax.tree.map(lambda x: x * 1.01, params)  # teacher != student, so trust_region's pair differs
  teacher_params = _method(mode, True).init_teacher_params(shifted, external)

  def inputs(share):
    return jax.jit(lambda s, t, b: _method(mode, share).no_grad_inputs(models, s, t, b))(params, teacher_params, batch)

  (shared_hidden, shared_w), (row_hidden, row_w) = inputs(True), inputs(False)
  assert len(shared_calls) == (2 if mode == "trust_region" else 1)
  mask = np.asarray(batch.response_mask)[..., None] > 0
  for a, b in zip(jax.tree.leaves(shared_hidden), jax.tree.leaves(row_hidden)):
    np.testing.assert_allclose(np.where(mask, a, 0), np.where(mask, b, 0), **TOL)
  jax.tree.map(np.testing.assert_array_equal, shared_w, row_w)


@pytest.mark.parametrize("mode,micro_batch_rows,mesh_shape,contexts", [
    ("ema", 0, None, (2, 1, 3, 2)),
    ("trust_region", G, None, (2, 1, 3, 2)),
    ("external", 0, (4, 2), (2, 1, 3, 2, 1, 1, 3, 2)),
    # 8 shards, micro-batches of 4 groups: K rounds up to a multiple of 2 (4 x K rows over 8 shards).
    ("frozen", 4 * G, (2, 4), (2, 1, 1, 1, 1, 2, 1, 1)),
])
def test_train_step_with_shared_contexts_equals_per_row(mode, micro_batch_rows, mesh_shape, contexts, shared_calls):
  """Loss, gradient norm and updated parameters of whole steps, micro-batched and sharded."""
  cfg, graphdef, params, teacher_def, external = _models(mode)
  # SGD: the update is linear in the gradient (Adam's first step ~ lr * sign(g) would turn
  # float noise on near-zero gradients into full-size differences).
  optimizer = optax.apply_if_finite(optax.sgd(1.0), 10)
  mesh = None if mesh_shape is None else sharding.make_mesh(sharding.MeshConfig(data=mesh_shape[0],
                                                                                fsdp=mesh_shape[1]))
  rows = _rows(cfg, contexts, groups=len(contexts))
  shards = 1 if mesh is None else sharding.num_batch_shards(mesh)
  multiple = batching.context_slot_multiple((micro_batch_rows or len(contexts) * G) // G, shards)
  batch = build_train_batch(rows, pad_id=0, prompt_buckets=(8, 16), response_buckets=(16,),
                            context_slot_multiple=multiple)
  assert batch.context_slots == max(2, max(contexts)) < G

  def run(share):
    step_cfg = StepConfig(method=_method(mode, share), group_size=G, micro_batch_rows=micro_batch_rows)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # the sharded step donates its states
    state = init_train_state(copy(params), optimizer)
    teacher = init_teacher_state(step_cfg, copy(params), copy(external))
    step = make_train_step(graphdef, optimizer, step_cfg, teacher_graphdef=teacher_def, mesh=mesh)
    if mesh is None:
      return jax.jit(step)(state, teacher, batch, jax.random.key(0))
    jitted = jit_train_step(step, mesh, state, teacher, optimizer)
    state = jax.device_put(state, jitted.state_shardings)
    return jitted(state, jax.device_put(teacher, jitted.teacher_shardings), batch, jax.random.key(0))

  (state_a, _, m_a), (state_b, _, m_b) = run(True), run(False)
  assert shared_calls
  np.testing.assert_allclose(float(m_a.loss), float(m_b.loss), rtol=1e-5)
  np.testing.assert_allclose(float(m_a.grad_norm), float(m_b.grad_norm), rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               state_a.params, state_b.params)
