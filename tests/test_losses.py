"""mopd_jax.losses against plain numpy references written here.

Numerics: the value/gradient comparisons run in float64 (`jax.enable_x64`) with atol 1e-6
or tighter, so the tolerances test the formulas, not float32 rounding. The production-dtype
checks (chunked == unchunked, teacher == student) also run in float32 at 1e-6.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import batching
from mopd_jax import losses as L


@contextlib.contextmanager
def x64():
  """float64 for the duration (jax.enable_x64; older jax: jax.experimental.enable_x64)."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:
    from jax.experimental import enable_x64 as ctx  # pragma: no cover
  with ctx(True):
    yield


# ------------------------------------------------------------------ numpy references


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(lp, lq):
  return float(np.sum(np.exp(lp) * (lp - lq)))


def np_divergence(ls, lt, alpha):
  """One position; ls, lt: log-prob vectors over the categories."""
  if alpha == 0:
    return np_kl(lt, ls)
  if alpha == 1:
    return np_kl(ls, lt)
  log_m = np.log((1 - alpha) * np.exp(ls) + alpha * np.exp(lt))
  return (1 - alpha) * np_kl(ls, log_m) + alpha * np_kl(lt, log_m)


def np_categories(ls, lt, k, tail):
  if k is None:
    return ls, lt
  ids = np.argsort(-ls, kind="stable")[:k]
  s, t = ls[ids], lt[ids]
  if tail:
    return np.append(s, np.log(1 - np.exp(s).sum())), np.append(t, np.log(1 - np.exp(t).sum()))
  return np_log_softmax(s), np_log_softmax(t)


def np_token_divergence(s_logits, t_logits, alpha, k, tail, temperature=1.0):
  """[B, T] divergences from logits [B, T, V]."""
  b, t, _ = s_logits.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      ls, lt = np_log_softmax(s_logits[i, j] / temperature), np_log_softmax(t_logits[i, j] / temperature)
      out[i, j] = np_divergence(*np_categories(ls, lt, k, tail), alpha)
  return out


def np_target_logp(logits, targets, temperature=1.0):
  lp = np_log_softmax(logits / temperature)
  return np.take_along_axis(lp, targets[..., None], -1)[..., 0]


def np_aggregate(x, m, mode, norm=None):
  if mode == "token-mean":
    return (x * m).sum() / max(m.sum(), 1)
  if mode == "seq-mean-token-sum-norm":  # verl's agg_loss: every row's token sum / a constant, no row count
    return float((x * m).sum(-1).sum() / (x.shape[1] if norm is None else norm))
  if mode == "seq-mean-token-mean-all-rows":  # the authors' verl runs: every row counts, a masked-out one as 0
    return float(sum((x[i] * m[i]).sum() / max(m[i].sum(), 1) for i in range(x.shape[0])) / x.shape[0])
  rows = [i for i in range(x.shape[0]) if m[i].sum() > 0]
  if not rows:
    return 0.0
  vals = []
  for i in rows:
    s = (x[i] * m[i]).sum()
    if mode == "seq-mean-token-sum":
      vals.append(s)
    elif mode == "seq-mean-token-mean":
      vals.append(s / m[i].sum())
  return float(np.mean(vals))


def np_step_mean(x, step_ids, m):
  out = np.zeros_like(x)
  for i in range(x.shape[0]):
    for s in np.unique(step_ids[i]):
      sel = step_ids[i] == s
      out[i, sel] = (x[i, sel] * m[i, sel]).sum() / max(m[i, sel].sum(), 1)
  return out


# ------------------------------------------------------------------ helpers

B, T, V, D = 2, 7, 23, 5


def rand_logits(seed, scale=2.0, shape=(B, T, V)):
  rng = np.random.default_rng(seed)
  return scale * rng.standard_normal(shape)


def rand_hidden(seed, b=B, t=T, d=D, v=V):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, d)), rng.standard_normal((b, t, d)),
          rng.standard_normal((d, v)), rng.standard_normal((d, v)), rng.integers(0, v, (b, t)))


def stats_kwargs(**kw):
  base = dict(top_k=5, use_tail=True, alpha=0.5, temperature=1.0)
  base.update(kw)
  return base


MODES = [  # (top_k, use_tail)
    (None, True), (5, True), (5, False)]
ALPHAS = [0.0, 0.3, 0.5, 1.0]


def directional_fd(f, x, v, eps=1e-5):
  return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


# ------------------------------------------------------------------ divergences


def divergence(student_logits, teacher_logits, **options):
  """The per-token divergence training computes (`token_stats`, as in each logits chunk)."""
  targets = jnp.zeros(student_logits.shape[:-1], jnp.int32)
  return L.token_stats(student_logits, teacher_logits, targets, **options).divergence


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("top_k,use_tail", MODES)
def test_token_divergence_matches_numpy(alpha, top_k, use_tail):
  s, t = rand_logits(0), rand_logits(1)
  with x64():
    got = divergence(jnp.asarray(s), jnp.asarray(t), alpha=alpha, top_k=top_k, use_tail=use_tail)
    np.testing.assert_allclose(np.asarray(got), np_token_divergence(s, t, alpha, top_k, use_tail), atol=1e-10)


def test_endpoints_are_kls_and_jsd_is_symmetric_mixture():
  s, t = rand_logits(2), rand_logits(3)
  with x64():
    ls, lt = jax.nn.log_softmax(jnp.asarray(s)), jax.nn.log_softmax(jnp.asarray(t))
    fwd = np.sum(np.exp(lt) * (lt - ls), -1)
    rev = np.sum(np.exp(ls) * (ls - lt), -1)
    np.testing.assert_allclose(L.generalized_jsd(ls, lt, 0.0), fwd, atol=1e-12)
    np.testing.assert_allclose(L.generalized_jsd(ls, lt, 1.0), rev, atol=1e-12)
    # JSD(alpha) of (s, t) equals JSD(1 - alpha) of (t, s); it vanishes towards both ends.
    np.testing.assert_allclose(L.generalized_jsd(ls, lt, 0.3), L.generalized_jsd(lt, ls, 0.7), atol=1e-12)
    assert float(jnp.max(L.generalized_jsd(ls, lt, 1e-9))) < 1e-7
  with pytest.raises(ValueError, match="alpha"):
    L.generalized_jsd(ls, lt, 1.5)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_tail_with_k_equal_vocab_equals_full_vocabulary(alpha):
  s, t = rand_logits(4), rand_logits(5)
  with x64():
    ls, lt = jnp.asarray(s), jnp.asarray(t)
    full = lambda a: divergence(a, lt, alpha=alpha, top_k=None)
    tail = lambda a: divergence(a, lt, alpha=alpha, top_k=V, use_tail=True)
    np.testing.assert_allclose(tail(ls), full(ls), atol=1e-10)
    g_full = jax.jit(jax.grad(lambda a: full(a).sum()))(ls)
    g_tail = jax.jit(jax.grad(lambda a: tail(a).sum()))(ls)
    np.testing.assert_allclose(g_tail, g_full, atol=1e-10)
  # float32 too: the clamped tail stays finite and within 1e-6.
  ls32, lt32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  a32 = divergence(ls32, lt32, alpha=alpha, top_k=V)
  b32 = divergence(ls32, lt32, alpha=alpha, top_k=None)
  assert np.all(np.isfinite(a32))
  np.testing.assert_allclose(a32, b32, atol=1e-6)


def test_tail_log_mass_is_stable():
  with x64():
    lp = jnp.log(jnp.asarray([[0.5, 0.25], [0.5, 0.5], [0.6, 0.6]]))  # mass 0.75, 1, > 1
    tail = np.asarray(L.tail_log_mass(lp))
    np.testing.assert_allclose(tail[0], np.log(0.25), atol=1e-14)
    assert np.all(np.isfinite(tail)) and tail[1] < -30 and tail[2] < -30
    g = jax.grad(lambda x: L.tail_log_mass(x).sum())(lp)
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------ token stats


@pytest.mark.parametrize("top_k,use_tail", MODES)
def test_token_stats_matches_numpy(top_k, use_tail):
  s, t = rand_logits(6), rand_logits(7)
  targets = np.random.default_rng(8).integers(0, V, (B, T))
  temp = 0.7
  with x64():
    st = L.token_stats(jnp.asarray(s), jnp.asarray(t), jnp.asarray(targets),
                       top_k=top_k, use_tail=use_tail, alpha=0.5, temperature=temp)
    np.testing.assert_allclose(st.divergence, np_token_divergence(s, t, 0.5, top_k, use_tail, temp), atol=1e-10)
    np.testing.assert_allclose(st.student_logp, np_target_logp(s, targets, temp), atol=1e-12)
    np.testing.assert_allclose(st.teacher_logp, np_target_logp(t, targets, temp), atol=1e-12)
    ls, lt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    np.testing.assert_allclose(st.student_entropy, -(np.exp(ls) * ls).sum(-1), atol=1e-12)
    if top_k is None:
      np.testing.assert_allclose(st.student_topk_mass, 1.0)
      np.testing.assert_allclose(st.teacher_tail_mass, 0.0)
    else:
      ids = np.argsort(-ls, axis=-1, kind="stable")[..., :top_k]
      s_mass = np.exp(np.take_along_axis(ls, ids, -1)).sum(-1)
      t_mass = np.exp(np.take_along_axis(lt, ids, -1)).sum(-1)
      np.testing.assert_allclose(st.student_topk_mass, s_mass, atol=1e-12)
      np.testing.assert_allclose(st.teacher_topk_mass, t_mass, atol=1e-12)
      np.testing.assert_allclose(st.student_tail_mass, 1 - s_mass, atol=1e-12)
      np.testing.assert_allclose(st.teacher_tail_mass, 1 - t_mass, atol=1e-12)


def test_sampled_token_stats():
  s, t = rand_logits(9), rand_logits(10)
  targets = np.random.default_rng(11).integers(0, V, (B, T))
  with x64():
    st = L.token_stats(jnp.asarray(s), jnp.asarray(t), jnp.asarray(targets), top_k=None, alpha=1.0,
                       full_logits=False)
    np.testing.assert_allclose(
        st.divergence, np_target_logp(s, targets) - np_target_logp(t, targets), atol=1e-12)


def _all_fields(st: L.TokenStats):
  return {k: np.asarray(v) for k, v in vars(st).items()}


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-12), ("float32", 1e-6)])
@pytest.mark.parametrize("top_k,use_tail,full_logits", [(None, True, True), (5, True, True), (5, False, True),
                                                        (None, True, False)])
def test_chunked_equals_unchunked(dtype, atol, top_k, use_tail, full_logits):
  hs, ht, ws, wt, tg = rand_hidden(12, t=10)
  ctx = x64() if dtype == "float64" else contextlib.nullcontext()
  with ctx:
    hs, ht, ws, wt = (jnp.asarray(a, dtype) for a in (hs, ht, ws, wt))
    tg = jnp.asarray(tg)
    alpha = 0.5 if full_logits else 1.0
    kw = stats_kwargs(top_k=top_k, use_tail=use_tail, alpha=alpha, full_logits=full_logits, temperature=0.9)
    # The materialised reference: logits for the whole sequence at once.
    ref = L.token_stats(hs @ ws, ht @ wt, tg, **kw)

    def loss(hs, ws, chunk):
      st = L.chunked_token_stats(hs, ht, ws, wt, tg, chunk_size=chunk, **kw)
      return jnp.sum(st.divergence * jnp.cos(jnp.arange(10.0))) + jnp.sum(st.student_logp), st

    grads = {}
    for chunk in (3, 10):  # 3: several chunks, the last one padded; 10 = T: a single chunk
      (_, st), grads[chunk] = jax.jit(
          jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(hs, ws, chunk)
      for name, val in _all_fields(st).items():
        np.testing.assert_allclose(val, getattr(ref, name), atol=atol, err_msg=f"{name} chunk={chunk}")
    for a, b in zip(grads[3], grads[10]):
      np.testing.assert_allclose(a, b, atol=10 * atol)


def test_chunked_accepts_bf16_hidden():
  hs, ht, ws, wt, tg = rand_hidden(13, t=10)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  st = L.chunked_token_stats(bf(hs), bf(ht), bf(ws), bf(wt), jnp.asarray(tg), chunk_size=4, **stats_kwargs())
  assert st.divergence.dtype == jnp.float32 and np.all(np.isfinite(st.divergence))
  ref = L.token_stats(L.linear_logits(bf(hs), bf(ws)), L.linear_logits(bf(ht), bf(wt)), jnp.asarray(tg),
                      **stats_kwargs())
  np.testing.assert_allclose(st.divergence, ref.divergence, atol=1e-6)


def test_trust_region_teacher():
  hs, ht, ws, wt, tg = rand_hidden(14, t=9)
  rate = 0.3
  with x64():
    args = [jnp.asarray(a) for a in (hs, ht, ws, wt)]
    hs, ht, ws, wt = args
    tg = jnp.asarray(tg)
    fn = L.trust_region_logit_fn(rate)
    st = L.chunked_token_stats(hs, (ht, hs), ws, (wt, ws), tg, chunk_size=4, teacher_logit_fn=fn, **stats_kwargs())
    lerp = (1 - rate) * np.asarray(ht @ wt) + rate * np.asarray(hs @ ws)
    np.testing.assert_allclose(st.divergence, np_token_divergence(np.asarray(hs @ ws), lerp, 0.5, 5, True),
                               atol=1e-10)
    # The student's own pair inside the teacher gets no gradient: only the student path does.
    def loss(t_pair_h):
      return L.chunked_token_stats(hs, (ht, t_pair_h), ws, (wt, ws), tg, chunk_size=4, teacher_logit_fn=fn,
                                   **stats_kwargs()).divergence.sum()
    assert np.all(np.asarray(jax.jit(jax.grad(loss))(hs)) == 0.0)


# ------------------------------------------------------------------ gradients


def _mopd_and_metrics(hs, ws, ht, wt, batch, cfg):
  """The MOPD loss as training computes it (`methods.Distillation`): statistics, then the loss."""
  return L.mopd_loss_from_stats(L.distill_token_stats(hs, ht, ws, wt, batch.targets, cfg), batch, cfg)


def _mopd(hs, ws, ht, wt, batch, cfg):
  return _mopd_and_metrics(hs, ws, ht, wt, batch, cfg)[0]


def _batch(seed, b=B, t=T, v=V, **kw):
  rng = np.random.default_rng(seed)
  resp = (rng.random((b, t)) < 0.8).astype(np.float64)
  resp[:, 0] = 1.0
  return L.DistillBatch(targets=jnp.asarray(rng.integers(0, v, (b, t))), response_mask=jnp.asarray(resp),
                        distill_mask=jnp.ones((b,)), **kw)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k,use_tail", MODES)
def test_grad_matches_finite_differences(alpha, top_k, use_tail):
  hs, ht, ws, wt, _ = rand_hidden(15)
  cfg = L.DistillConfig(alpha=alpha, top_k=top_k, use_tail=use_tail, chunk_size=3, temperature=0.8)
  rng = np.random.default_rng(16)
  with x64():
    hs, ht, ws, wt = (jnp.asarray(a) for a in (hs, ht, ws, wt))
    batch = _batch(17)
    f = jax.jit(lambda h, w: _mopd(h, w, ht, wt, batch, cfg))
    gh, gw = jax.grad(f, argnums=(0, 1))(hs, ws)
    for _ in range(2):
      vh, vw = rng.standard_normal(hs.shape), rng.standard_normal(ws.shape)
      fd_h = directional_fd(lambda x: f(x, ws), hs, vh)
      fd_w = directional_fd(lambda x: f(hs, x), ws, vw)
      np.testing.assert_allclose(np.sum(gh * vh), fd_h, rtol=1e-6, atol=1e-8)
      np.testing.assert_allclose(np.sum(gw * vw), fd_w, rtol=1e-6, atol=1e-8)


def test_sampled_token_grad_is_policy_gradient():
  """Gradient of stopgrad(ls - lt) * ls equals c * d ls with c held at its current value."""
  hs, ht, ws, wt, _ = rand_hidden(18)
  cfg = L.DistillConfig(alpha=1.0, full_logits=False, chunk_size=3)
  with x64():
    hs, ht, ws, wt = (jnp.asarray(a) for a in (hs, ht, ws, wt))
    batch = _batch(19)
    mask = np.asarray(batch.response_mask)
    tg = np.asarray(batch.targets)
    ls0 = np_target_logp(np.asarray(hs @ ws), tg)
    c = ls0 - np_target_logp(np.asarray(ht @ wt), tg)
    loss = float(jax.jit(_mopd, static_argnums=5)(hs, ws, ht, wt, batch, cfg))
    np.testing.assert_allclose(loss, (c * ls0 * mask).sum() / mask.sum(), atol=1e-12)
    surrogate = lambda h: float(((c * np_target_logp(np.asarray(h @ ws), tg)) * mask).sum() / mask.sum())
    g = jax.jit(jax.grad(lambda h: _mopd(h, ws, ht, wt, batch, cfg)))(hs)
    v = np.random.default_rng(20).standard_normal(hs.shape)
    np.testing.assert_allclose(np.sum(g * v), directional_fd(surrogate, np.asarray(hs), v), rtol=1e-6)


@pytest.mark.parametrize("alpha,top_k,full_logits", [(0.0, None, True), (0.5, 5, True), (1.0, 5, True),
                                                     (1.0, None, False)])
def test_teacher_receives_no_gradient(alpha, top_k, full_logits):
  hs, ht, ws, wt, _ = rand_hidden(21)
  cfg = L.DistillConfig(alpha=alpha, top_k=top_k, full_logits=full_logits, chunk_size=3)
  batch = _batch(22)
  hs, ht, ws, wt = (jnp.asarray(a, jnp.float32) for a in (hs, ht, ws, wt))
  grads = jax.jit(jax.grad(lambda *a: _mopd(*a, batch, cfg), argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
  g_hs, _, g_ht, g_wt = (np.asarray(g) for g in grads)
  assert np.all(g_ht == 0.0) and np.all(g_wt == 0.0)
  assert np.any(g_hs != 0.0)


@pytest.mark.parametrize("alpha,top_k,use_tail,full_logits", [
    (a, k, tail, True) for a in ALPHAS for k, tail in MODES] + [(1.0, None, True, False)])
def test_teacher_equal_student_gives_zero(alpha, top_k, use_tail, full_logits):
  hs, _, ws, _, _ = rand_hidden(23)
  hs, ws = jnp.asarray(hs, jnp.float32), jnp.asarray(ws, jnp.float32)
  cfg = L.DistillConfig(alpha=alpha, top_k=top_k, use_tail=use_tail, full_logits=full_logits, chunk_size=3)
  batch = _batch(24)
  loss, grads = jax.jit(jax.value_and_grad(lambda h, w: _mopd(h, w, h, w, batch, cfg), argnums=(0, 1)))(hs, ws)
  assert abs(float(loss)) <= 1e-6
  for g in grads:
    assert float(jnp.max(jnp.abs(g))) <= 1e-6


# ------------------------------------------------------------------ weights, steps, aggregation


def test_importance_weight_clip():
  rng = np.random.default_rng(25)
  lp, old = rng.standard_normal((B, T)) * 2, rng.standard_normal((B, T)) * 2
  lp[0, 0], old[0, 0] = 30.0, -30.0  # exercises the +-20 clip
  with x64():
    for clip in (2.0, None):
      got = np.asarray(L.importance_weight(jnp.asarray(lp), jnp.asarray(old), clip))
      ref = np.exp(np.clip(lp - old, -20, 20))
      if clip is not None:
        ref = np.minimum(ref, clip)
      np.testing.assert_allclose(got, ref, rtol=1e-12)
    g = jax.grad(lambda x: jnp.sum(L.importance_weight(x, jnp.asarray(old)) * x))(jnp.asarray(lp))
    np.testing.assert_allclose(g, np.minimum(np.exp(np.clip(lp - old, -20, 20)), 2.0), rtol=1e-12)


def test_mismatch_corrections():
  trainer = np.log(np.array([[0.5, 0.5, 0.5, 0.5]]))
  sampler = np.log(np.array([[0.5, 0.2, 0.9, 0.3]]))  # ratios 1, 2.5, 0.56, 1.67
  with x64():
    w, keep = L.mismatch_mask(jnp.asarray(trainer), jnp.asarray(sampler), 2.0)
    np.testing.assert_array_equal(keep, [[1, 0, 1, 1]])
    np.testing.assert_array_equal(w, 1.0)
  assert set(L.MISMATCH_CORRECTIONS) == {"mask"}  # "tis" is the importance weight itself: see below


def test_truncated_is_mismatch_is_refused_because_the_importance_weight_is_it():
  """The IS weight min(p_student / p_sampler, is_clip) already is the authors' token-level TIS
  (verl rollout_is=token, threshold 2, times a PPO ratio of 1 on-policy): a "tis" correction
  on top squared it. Refused, naming the field and the way to get what it was for."""
  with pytest.raises(ValueError, match=r"DistillConfig.mismatch: 'tis' .*is_clip.*twice"):
    L.DistillConfig(mismatch="tis")
  with x64():
    hs, ht, ws, wt = (jnp.asarray(a) for a in rand_hidden(44)[:4])
    batch = _batch(45)
    ls = L.chunked_token_stats(hs, ht, ws, wt, batch.targets, chunk_size=3, **stats_kwargs()).student_logp
    off = np.random.default_rng(46).normal(0, 0.8, (B, T))
    _, met = _mopd_and_metrics(hs, ws, ht, wt, batch.replace(old_logp=ls - off), L.DistillConfig(top_k=5))
  w, m = np.minimum(np.exp(off), 2.0), np.asarray(batch.response_mask * batch.distill_mask[:, None])
  assert (np.exp(off) > 2.0).any() and (np.exp(off) < 1.0).any()
  np.testing.assert_allclose(float(met.is_weight), (w * m).sum() / m.sum(), rtol=1e-10)  # once, not squared


def test_step_ids_and_step_mean():
  """Step ids as the trainer makes them (`batching.step_ids_from_text_offsets`): a token that
  completes a separator closes its step."""
  rows = [["a", "b", "\n\n", "c", "\n\n", "\n\n", "d", "e"], ["\n\n", "a", "b", "c", "d", "e", "f", "\n\n"]]
  ids = np.array([batching.step_ids_from_text_offsets(r) for r in rows])
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]])
  sep = np.array([[t == "\n\n" for t in r] for r in rows])
  rng = np.random.default_rng(26)
  x = rng.standard_normal(sep.shape)
  m = (rng.random(sep.shape) < 0.7).astype(np.float64)
  with x64():
    got = np.asarray(L.step_mean(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(m)))
  np.testing.assert_allclose(got, np_step_mean(x, ids, m), atol=1e-12)


def test_step_ids_follow_separators_across_token_boundaries():
  """Whatever the tokenizer does with the separator (one token, glued to text, split in two,
  doubled), a new step starts after the token that completes it."""
  toks = ["Step", " one", ".\n\n", "Then", "\n", "\n", "x", "\n\n\n\n", "", "end"]
  assert batching.step_ids_from_text_offsets(toks) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
  assert batching.step_ids_from_text_offsets(["a", "b"]) == [0, 0]


@pytest.mark.parametrize("mode", sorted(L.LOSS_AGGREGATIONS))
def test_aggregations(mode):
  rng = np.random.default_rng(27)
  x = rng.standard_normal((4, 6))
  m = (rng.random((4, 6)) < 0.6).astype(np.float64)
  m[2] = 0.0  # a fully masked row does not count in the seq-mean modes
  with x64():
    for norm in (None, 10.0):
      got = float(L.aggregate_loss(jnp.asarray(x), jnp.asarray(m), mode, norm))
      np.testing.assert_allclose(got, np_aggregate(x, m, mode, norm), rtol=1e-12)
    assert float(L.aggregate_loss(jnp.asarray(x), jnp.zeros((4, 6)), mode)) == 0.0
  with pytest.raises(ValueError, match="loss_agg"):
    L.aggregate_loss(jnp.asarray(x), jnp.asarray(m), "nope")


def test_seq_mean_token_sum_norm_divides_by_the_constant_only():
  """verl's agg_loss (the authors' verl/trainer/ppo/core_algos.py): sum over the rows of each
  row's token sum, divided by loss_scale_factor (None: the padded length), and by nothing that
  varies with the batch: masking rows out, or adding an empty row, leaves the other rows' terms as
  they are. Micro-batch shares (denominator = the batch's count) add up to the whole."""
  rng = np.random.default_rng(43)
  x = rng.standard_normal((5, 7))
  m = (np.arange(7)[None] < np.array([7, 2, 0, 5, 3])[:, None]).astype(np.float64)
  mode = "seq-mean-token-sum-norm"
  with x64():
    agg = lambda xs, ms, norm=None, den=None: float(L.aggregate_loss(jnp.asarray(xs), jnp.asarray(ms), mode, norm, den))
    np.testing.assert_allclose(agg(x, m, 64.0), (x * m).sum() / 64.0, rtol=1e-12)
    np.testing.assert_allclose(agg(x, m), (x * m).sum() / 7, rtol=1e-12)
    fewer = m * np.array([1, 0, 0, 1, 1])[:, None]  # two rows fewer: their terms go, nothing else moves
    np.testing.assert_allclose(agg(x, fewer, 64.0), (x * fewer).sum() / 64.0, rtol=1e-12)
    assert float(L.agg_denominator(mode, jnp.asarray(m))) == 1.0
    shares = sum(agg(x[sl], m[sl], 64.0, L.agg_denominator(mode, jnp.asarray(m))) for sl in (slice(0, 2), slice(2, 5)))
  np.testing.assert_allclose(shares, (x * m).sum() / 64.0, rtol=1e-12)


def _row_splits(rows: int, parts: int) -> list[slice]:
  size = rows // parts
  return [slice(i * size, (i + 1) * size) for i in range(parts)]


@pytest.mark.parametrize("mode", sorted(L.LOSS_AGGREGATIONS))
def test_aggregation_denominator_override_splits_the_batch_exactly(mode):
  """Row slices with the whole batch's count as denominator sum to the whole batch's loss;
  denominator 1 gives the plain sum. Rows of very unequal lengths, and a fully masked row."""
  rng = np.random.default_rng(40)
  x = rng.standard_normal((6, 8))
  m = (np.arange(8)[None] < np.array([8, 1, 0, 6, 2, 3])[:, None]).astype(np.float64)
  with x64():
    xj, mj = jnp.asarray(x), jnp.asarray(m)
    whole = float(L.aggregate_loss(xj, mj, mode, 5.0))
    den = L.agg_denominator(mode, mj)
    # Tokens; rows with a token (row 2 has none); sum-norm's constant divides the rows, its count is 1.
    assert float(den) == {"token-mean": m.sum(), "seq-mean-token-sum-norm": 1.0,
                          "seq-mean-token-mean-all-rows": 6.0}.get(mode, 5.0)
    shares = [float(L.aggregate_loss(xj[sl], mj[sl], mode, 5.0, den)) for sl in _row_splits(6, 3)]
    sums = [float(L.aggregate_loss(xj[sl], mj[sl], mode, 5.0, 1.0)) for sl in _row_splits(6, 3)]
    naive = np.mean([float(L.aggregate_loss(xj[sl], mj[sl], mode, 5.0)) for sl in _row_splits(6, 3)])
  np.testing.assert_allclose(sum(shares), whole, rtol=1e-12)
  np.testing.assert_allclose(sum(sums) / float(den), whole, rtol=1e-12)
  if mode != "seq-mean-token-mean-all-rows":  # equal slices of a mean over every row: naive is right
    assert abs(naive - whole) > 1e-3  # per-slice normalisation would be visibly wrong here


def test_loss_denominators_split_every_loss_exactly():
  """MOPD (with the mismatch mask: a count that depends on the student), GRPO, DPO, SimPO, SFT:
  the sum over row slices (whole groups) of each slice's loss with the whole batch's
  denominator equals the whole batch's loss, value and gradient."""
  hs, ht, ws, wt, targets = rand_hidden(41, b=4, t=6)
  rng = np.random.default_rng(42)
  resp = (np.arange(6)[None] < np.array([6, 1, 4, 2])[:, None]).astype(np.float64)
  logp = rng.normal(-1.5, 0.5, (4, 6))
  splits = _row_splits(4, 2)
  with x64():
    j = jnp.asarray
    stats = L.chunked_token_stats(j(hs), j(ht), j(ws), j(wt), j(targets), chunk_size=3, **stats_kwargs())
    old = stats.student_logp + j(rng.normal(0, 0.6, (4, 6)))  # ratios on both sides of the mask's [1/2, 2]
    cfg = L.DistillConfig(top_k=5, chunk_size=3, mismatch="mask", loss_agg="seq-mean-token-mean")
    dbatch = L.DistillBatch(targets=j(targets), response_mask=j(resp), distill_mask=j([1.0, 1.0, 0.0, 1.0]),
                            old_logp=old)
    whole, met = L.mopd_loss_from_stats(stats, dbatch, cfg)
    den = L.mopd_loss_denominator(stats, dbatch, cfg)
    # Row 1's only token is outside the mismatch mask's [1/2, 2], row 2 has distill_mask 0.
    assert 0 < float(met.mismatch_masked_frac) < 1 and float(den) == 2.0
    part = lambda tree, sl: jax.tree.map(lambda a: a[sl], tree)
    shares = [L.mopd_loss_from_stats(part(stats, sl), part(dbatch, sl), cfg, den)[0] for sl in splits]
    np.testing.assert_allclose(float(sum(shares)), float(whole), rtol=1e-12)

    adv = j([1.0, -1.0, 0.5, -0.5])
    gb = L.GRPOBatch(old_logp=j(logp + 0.3), advantages=adv, response_mask=j(resp), ref_logp=j(logp - 0.2))
    pb = L.PreferenceBatch(response_mask=j(resp), chosen=j([0, 3]), rejected=j([1, 2]), pair_mask=j([1.0, 1.0]),
                           ref_seq_logp=j(rng.normal(-5, 1, 4)))
    sb = L.SFTBatch(response_mask=j(resp), success=j([1.0, 0.0, 1.0, 1.0]))
    cases = {"grpo": (L.grpo_loss, L.grpo_loss_denominator, gb, L.GRPOConfig(), splits),
             "dpo": (L.dpo_loss, L.pair_loss_denominator, pb, L.DPOConfig(), None),
             "simpo": (L.simpo_loss, L.pair_loss_denominator, pb, L.SimPOConfig(), None),
             "sft": (L.sft_loss, L.sft_loss_denominator, sb, L.SFTConfig(), splits)}
    for name, (fn, denominator, batch, config, rows) in cases.items():
      den = denominator(batch, config)
      whole_fn = lambda lp: fn(lp, batch, config)[0]
      if rows is None:  # pairs: one per group of two rows; slice the pairs and re-index
        slices = [(sl, batch.replace(chosen=batch.chosen[k:k + 1] - 2 * k, rejected=batch.rejected[k:k + 1] - 2 * k,
                                     pair_mask=batch.pair_mask[k:k + 1], response_mask=batch.response_mask[sl],
                                     ref_seq_logp=batch.ref_seq_logp[sl]))
                  for k, sl in enumerate(splits)]
      else:
        slices = [(sl, part(batch, sl)) for sl in rows]
      split_fn = lambda lp: sum(fn(lp[sl], b, config, den)[0] for sl, b in slices)
      np.testing.assert_allclose(float(split_fn(j(logp))), float(whole_fn(j(logp))), rtol=1e-12, err_msg=name)
      np.testing.assert_allclose(jax.grad(split_fn)(j(logp)), jax.grad(whole_fn)(j(logp)), atol=1e-12,
                                 err_msg=name)


# ------------------------------------------------------------------ the full MOPD loss


def np_mopd(s_logits, t_logits, targets, resp, dmask, old, cfg: L.DistillConfig, step_ids=None):
  div = np_token_divergence(s_logits, t_logits, cfg.alpha, cfg.top_k, cfg.use_tail, cfg.temperature)
  ls = np_target_logp(s_logits, targets, cfg.temperature)
  w = np.minimum(np.exp(np.clip(ls - old, -20, 20)), cfg.is_clip)
  m = resp * dmask[:, None]
  x = div * w
  if cfg.step_level:
    x = np_step_mean(x, step_ids, m)
  return np_aggregate(x, m, cfg.loss_agg, cfg.agg_norm), div, m


@pytest.mark.parametrize("loss_agg", sorted(L.LOSS_AGGREGATIONS))
@pytest.mark.parametrize("step_level", [False, True])
def test_mopd_distill_loss_matches_numpy(loss_agg, step_level):
  b, t = 3, 8
  hs, ht, ws, wt, _ = rand_hidden(28, b=b, t=t)
  rng = np.random.default_rng(29)
  resp = np.ones((b, t))
  resp[0, 6:] = 0.0
  dmask = np.array([1.0, 0.0, 1.0])
  old = rng.normal(-3, 1, (b, t))
  sep = rng.random((b, t)) < 0.3
  step_ids = np.cumsum(sep, -1) - sep
  targets = rng.integers(0, V, (b, t))
  cfg = L.DistillConfig(alpha=0.4, top_k=6, chunk_size=3, loss_agg=loss_agg, step_level=step_level, is_clip=2.0)
  with x64():
    batch = L.DistillBatch(targets=jnp.asarray(targets), response_mask=jnp.asarray(resp),
                           distill_mask=jnp.asarray(dmask), old_logp=jnp.asarray(old),
                           step_ids=jnp.asarray(step_ids))
    loss, met = _mopd_and_metrics(*(jnp.asarray(a) for a in (hs, ws, ht, wt)), batch, cfg)
  ref, div, m = np_mopd(hs @ ws, ht @ wt, targets, resp, dmask, old, cfg, step_ids)
  w = np.exp(np_target_logp(hs @ ws, targets) - old)
  assert (w > 2).any() and (w < 2).any()  # the IS cap is exercised
  np.testing.assert_allclose(float(loss), ref, rtol=1e-10)
  np.testing.assert_allclose(float(met.loss), ref, rtol=1e-10)
  np.testing.assert_allclose(float(met.divergence), (div * m).sum() / m.sum(), rtol=1e-10)
  np.testing.assert_allclose(float(met.masked_frac), 1 - m.sum() / resp.sum(), rtol=1e-12)
  assert float(met.num_tokens) == m.sum()
  assert 0.0 < float(met.student_topk_mass) <= 1.0 and 0.0 <= float(met.teacher_tail_mass) < 1.0


def test_mopd_mismatch_mask_excludes_tokens():
  hs, ht, ws, wt, _ = rand_hidden(30)
  with x64():
    hs, ht, ws, wt = (jnp.asarray(a) for a in (hs, ht, ws, wt))
    batch = _batch(31)
    ls = L.chunked_token_stats(hs, ht, ws, wt, batch.targets, chunk_size=3, **stats_kwargs()).student_logp
    off = np.zeros((B, T))
    off[0, 1], off[1, 2] = 2.0, -2.0  # ratios e^2 and e^-2: outside [1/2, 2]
    batch = batch.replace(old_logp=ls - off)
    cfg = L.DistillConfig(top_k=5, chunk_size=3, mismatch="mask", is_clip=None)
    _, met = _mopd_and_metrics(hs, ws, ht, wt, batch, cfg)
    resp = np.asarray(batch.response_mask)
    dropped = resp[0, 1] + resp[1, 2]
    np.testing.assert_allclose(float(met.mismatch_masked_frac), dropped / resp.sum(), rtol=1e-12)
    np.testing.assert_allclose(float(met.num_tokens), resp.sum() - dropped)


def test_distill_config_validation():
  with pytest.raises(ValueError, match="full_logits"):
    L.DistillConfig(alpha=0.5, full_logits=False)
  with pytest.raises(ValueError, match="alpha"):
    L.DistillConfig(alpha=-0.1)
  with pytest.raises(ValueError, match="loss_agg"):
    L.DistillConfig(loss_agg="mean")
  with pytest.raises(ValueError, match="mismatch"):
    L.DistillConfig(mismatch="clip")
  with pytest.raises(ValueError, match="top_k"):
    L.token_stats(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), top_k=5)
  hash(L.DistillConfig())  # static jit argument


# ------------------------------------------------------------------ baselines


def test_chunked_target_logp():
  hs, _, ws, _, tg = rand_hidden(32, t=10)
  with x64():
    logp, ent = L.chunked_target_logp(jnp.asarray(hs), jnp.asarray(ws), jnp.asarray(tg), temperature=0.8,
                                      chunk_size=4)
  np.testing.assert_allclose(logp, np_target_logp(hs @ ws, tg, 0.8), atol=1e-12)
  lp = np_log_softmax(hs @ ws / 0.8)
  np.testing.assert_allclose(ent, -(np.exp(lp) * lp).sum(-1), atol=1e-12)


def test_group_advantages():
  r = np.array([[1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
  with x64():
    adv = np.asarray(L.group_advantages(jnp.asarray(r)))
    raw = np.asarray(L.group_advantages(jnp.asarray(r), normalize_std=False))
    one = np.asarray(L.group_advantages(jnp.asarray(r[:, :1])))
  mean = r.mean(1, keepdims=True)
  np.testing.assert_allclose(adv, (r - mean) / (r.std(1, ddof=1, keepdims=True) + 1e-6), rtol=1e-12)
  np.testing.assert_allclose(raw, r - mean, atol=1e-15)
  np.testing.assert_array_equal(adv[1], 0.0)
  np.testing.assert_array_equal(one, 0.0)


def np_grpo(logp, old, adv, mask, ref, clip=0.2, coef=0.001, clip_high=None, clip_c=None):
  """verl's compute_policy_loss_vanilla: PPO clip to [1 - clip, 1 + clip_high], then for A < 0
  the dual clip caps the loss at -A * clip_c; token-mean; plus coef x k3 KL."""
  ratio, a = np.exp(logp - old), adv[:, None]
  pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip, 1 + (clip if clip_high is None else clip_high)))
  if clip_c is not None:
    pg = np.where(a < 0, np.minimum(pg, -a * clip_c), pg)
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  tm = lambda x: (x * mask).sum() / mask.sum()
  return tm(pg) + coef * tm(k3), tm(pg), tm(k3)


def test_grpo_loss():
  rng = np.random.default_rng(33)
  logp = rng.normal(-2, 1, (4, 6))
  old = logp + rng.normal(0, 0.4, (4, 6))  # ratios well outside [0.8, 1.2] for some tokens
  ref = logp + rng.normal(0, 0.3, (4, 6))
  adv = np.array([1.0, -0.5, 0.3, -1.2])
  mask = (rng.random((4, 6)) < 0.8).astype(np.float64)
  with x64():
    batch = L.GRPOBatch(old_logp=jnp.asarray(old), advantages=jnp.asarray(adv), response_mask=jnp.asarray(mask),
                        ref_logp=jnp.asarray(ref))
    symmetric = L.GRPOConfig(clip_eps=0.2, clip_high=0.2, clip_c=None)  # plain PPO clip; defaults: next test
    f = lambda lp: L.grpo_loss(lp, batch, symmetric)[0]
    loss, met = L.grpo_loss(jnp.asarray(logp), batch, symmetric)
    g = jax.grad(f)(jnp.asarray(logp))
    no_kl, _ = L.grpo_loss(jnp.asarray(logp), batch.replace(ref_logp=None), symmetric)
  total, pg, kl = np_grpo(logp, old, adv, mask, ref)
  np.testing.assert_allclose([float(loss), float(met.pg_loss), float(met.kl)], [total, pg, kl], rtol=1e-12)
  np.testing.assert_allclose(float(no_kl), pg, rtol=1e-12)
  ratio = np.exp(logp - old)
  clipped = ((adv[:, None] > 0) & (ratio > 1.2)) | ((adv[:, None] < 0) & (ratio < 0.8))
  assert clipped[mask > 0].any() and (~clipped[mask > 0]).any()
  np.testing.assert_allclose(float(met.clip_frac), (clipped * mask).sum() / mask.sum(), rtol=1e-12)
  # Clipped tokens carry no policy-gradient signal; others -A * ratio (+ the k3 term).
  ref_g = np.where(clipped, 0.0, -adv[:, None] * ratio) + 0.001 * (1 - np.exp(ref - logp))
  np.testing.assert_allclose(g, ref_g * mask / mask.sum(), atol=1e-12)


def test_grpo_asymmetric_and_dual_clip_match_numpy():
  """The authors' GRPO baseline clips as verl's compute_policy_loss_vanilla with clip_ratio_low
  0.2 (verl/trainer/config/actor/actor.yaml), clip_ratio_high 0.28 (verl/trainer/config/user.yaml)
  and dual-clip clip_ratio_c 3 (actor.yaml): GRPOConfig's defaults. One token per branch."""
  cfg = L.GRPOConfig()
  assert (cfg.clip_eps, cfg.clip_high, cfg.clip_c) == (0.2, 0.28, 3.0)
  ratios = np.array([[0.5, 1.1, 1.25, 1.5],  # A = +1: below 1 - low (no clip for A > 0), inside, inside
                     [0.5, 0.9, 2.0, 5.0]])  # 1 + high (0.2 would clip it), above 1 + high; A = -1: below
  adv = np.array([1.0, -1.0])  # 1 - low, inside, above 1 + high under c (unclipped), above c (dual clip)
  old = np.random.default_rng(47).normal(-2.0, 0.5, (2, 4))
  logp, mask = old + np.log(ratios), np.ones((2, 4))
  per_token = np.array([[-0.5, -1.1, -1.25, -1.28], [0.8, 0.9, 2.0, 3.0]])
  grad = np.array([[-0.5, -1.1, -1.25, 0.0], [0.0, 0.9, 2.0, 0.0]]) / 8  # d loss / d logp (token-mean)
  with x64():
    batch = L.GRPOBatch(old_logp=jnp.asarray(old), advantages=jnp.asarray(adv), response_mask=jnp.asarray(mask))
    loss, met = L.grpo_loss(jnp.asarray(logp), batch, cfg)
    g = jax.grad(lambda lp: L.grpo_loss(lp, batch, cfg)[0])(jnp.asarray(logp))
    sym = float(L.grpo_loss(jnp.asarray(logp), batch, L.GRPOConfig(clip_high=0.2))[0])
    no_dual = float(L.grpo_loss(jnp.asarray(logp), batch, L.GRPOConfig(clip_c=None))[0])
  np.testing.assert_allclose(float(loss), per_token.mean(), rtol=1e-12)
  np.testing.assert_allclose(float(loss), np_grpo(logp, old, adv, mask, old, clip_high=0.28, clip_c=3.0)[1], rtol=1e-12)
  np.testing.assert_allclose(g, grad, atol=1e-12)
  np.testing.assert_allclose(sym, (per_token.sum() + 0.05 + 0.08) / 8, rtol=1e-12)  # 1.25, 1.5 clipped at 1.2
  np.testing.assert_allclose(no_dual, (per_token.sum() - 3.0 + 5.0) / 8, rtol=1e-12)  # 5 no longer capped at 3
  assert float(met.clip_frac) == 2 / 8 and float(met.dual_clip_frac) == 1 / 8

  rng = np.random.default_rng(48)  # and random tokens, values and gradients, KL on
  logp = rng.normal(-2, 1, (6, 9))
  old = logp + rng.normal(0, 0.9, (6, 9))
  ref = logp + rng.normal(0, 0.3, (6, 9))
  adv, mask = rng.normal(0, 1, 6), (rng.random((6, 9)) < 0.8).astype(np.float64)
  ratio = np.exp(logp - old)
  assert ((adv[:, None] < 0) & (ratio > 3) & (mask > 0)).any()  # the dual clip binds somewhere
  with x64():
    batch = L.GRPOBatch(old_logp=jnp.asarray(old), advantages=jnp.asarray(adv), response_mask=jnp.asarray(mask),
                        ref_logp=jnp.asarray(ref))
    f = lambda lp: L.grpo_loss(lp, batch, cfg)[0]
    loss, g = float(f(jnp.asarray(logp))), jax.grad(f)(jnp.asarray(logp))
  np.testing.assert_allclose(loss, np_grpo(logp, old, adv, mask, ref, clip_high=0.28, clip_c=3.0)[0], rtol=1e-12)
  eps = 1e-6
  for i, j in [(r, c) for r in range(6) for c in range(9) if mask[r, c] > 0][::5]:
    d = np.zeros_like(logp)
    d[i, j] = eps
    fd = (np_grpo(logp + d, old, adv, mask, ref, clip_high=0.28, clip_c=3.0)[0]
          - np_grpo(logp - d, old, adv, mask, ref, clip_high=0.28, clip_c=3.0)[0]) / (2 * eps)
    np.testing.assert_allclose(float(g[i, j]), fd, atol=1e-7)


def test_grpo_config_validation():
  for kw, field in [({"clip_eps": 0.0}, "clip_eps"), ({"clip_high": -0.1}, "clip_high"), ({"clip_c": 1.0}, "clip_c"),
                    ({"clip_c": 0.5}, "clip_c")]:
    with pytest.raises(ValueError, match=rf"GRPOConfig.{field}: must be"):
      L.GRPOConfig(**kw)
  assert L.GRPOConfig(clip_c=None).clip_c is None  # dual clip off
  hash(L.GRPOConfig())


def test_preference_pairs():
  """The in-jit pairs the DPO / SimPO step trains on: j-th best vs j-th worst of each group."""
  r = np.array([[0.0, 1.0, 0.5, 1.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.2]])
  c, rj, m = (np.asarray(x) for x in jax.jit(L.preference_pairs, static_argnums=(1, 2))(jnp.asarray(r.reshape(-1)), 4, 2))
  np.testing.assert_array_equal(m, [1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(c[m > 0], [1, 3, 8, 11])
  np.testing.assert_array_equal(rj[m > 0], [0, 2, 10, 9])
  assert np.all(r.reshape(-1)[c[m > 0]] > r.reshape(-1)[rj[m > 0]])
  # At most G / 2 pairs per group: a rollout is never paired with itself.
  c, rj, m = L.preference_pairs(jnp.asarray(r.reshape(-1)), 4, 5)
  assert c.shape == (6,) and not np.any(np.asarray(c) == np.asarray(rj))


def _pref_inputs(seed):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, (6, 5))
  mask = np.ones((6, 5))
  mask[1, 3:] = mask[4, 2:] = 0.0
  ref_seq = rng.normal(-7, 1, 6)
  chosen, rejected, pm = np.array([0, 2, 5, 0]), np.array([1, 4, 3, 0]), np.array([1.0, 1.0, 1.0, 0.0])
  return logp, mask, ref_seq, chosen, rejected, pm


def _logsig(x):
  return -np.log1p(np.exp(-x))


def test_dpo_and_simpo():
  logp, mask, ref_seq, c, r, pm = _pref_inputs(34)
  with x64():
    batch = L.PreferenceBatch(response_mask=jnp.asarray(mask), chosen=jnp.asarray(c), rejected=jnp.asarray(r),
                              pair_mask=jnp.asarray(pm), ref_seq_logp=jnp.asarray(ref_seq))
    dpo, dmet = L.dpo_loss(jnp.asarray(logp), batch, L.DPOConfig(beta=0.1))
    simpo, smet = L.simpo_loss(jnp.asarray(logp), batch, L.SimPOConfig(beta=2.0, gamma=1.0))
    g_dpo = jax.grad(lambda x: L.dpo_loss(x, batch)[0])(jnp.asarray(logp))
  seq = (logp * mask).sum(1)
  avg = seq / mask.sum(1)
  real = pm > 0
  d_margin = 0.1 * ((seq[c] - ref_seq[c]) - (seq[r] - ref_seq[r]))
  s_margin = 2.0 * (avg[c] - avg[r]) - 1.0
  np.testing.assert_allclose(float(dpo), -_logsig(d_margin[real]).mean(), rtol=1e-12)
  np.testing.assert_allclose(float(simpo), -_logsig(s_margin[real]).mean(), rtol=1e-12)
  np.testing.assert_allclose(float(dmet.accuracy), (d_margin[real] > 0).mean())
  assert float(smet.num_pairs) == 3
  # d/d logp[i, t] = -beta * sigmoid(-margin) * (+1 chosen / -1 rejected) * mask / n_pairs
  ref_g = np.zeros_like(logp)
  sig = 1 / (1 + np.exp(d_margin))
  for k in np.nonzero(real)[0]:
    ref_g[c[k]] -= 0.1 * sig[k] * mask[c[k]] / 3
    ref_g[r[k]] += 0.1 * sig[k] * mask[r[k]] / 3
  np.testing.assert_allclose(g_dpo, ref_g, atol=1e-12)
  with pytest.raises(ValueError, match="ref_seq_logp"):
    L.dpo_loss(jnp.asarray(logp), batch.replace(ref_seq_logp=None))


def test_sft_loss():
  rng = np.random.default_rng(35)
  logp = rng.normal(-2, 1, (4, 5))
  mask = (rng.random((4, 5)) < 0.8).astype(np.float64)
  success = np.array([1.0, 0.0, 1.0, 0.0])
  with x64():
    loss, met = L.sft_loss(jnp.asarray(logp), L.SFTBatch(response_mask=jnp.asarray(mask),
                                                         success=jnp.asarray(success)))
  m = mask * success[:, None]
  np.testing.assert_allclose(float(loss), -(logp * m).sum() / m.sum(), rtol=1e-12)
  assert float(met.num_sequences) == 2 and float(met.num_tokens) == m.sum()


# ------------------------------------------------------------------ memory


def _compiled_temp_bytes(seq: int, vocab: int, hidden: int, chunk: int, dtype) -> tuple[int, float]:
  cfg = L.DistillConfig(chunk_size=chunk)  # paper defaults: alpha 0.5, top-k 100 with tail
  s = jax.ShapeDtypeStruct
  h, w = s((1, seq, hidden), dtype), s((hidden, vocab), dtype)
  batch = L.DistillBatch(targets=s((1, seq), jnp.int32), response_mask=s((1, seq), jnp.float32),
                         distill_mask=s((1,), jnp.float32), old_logp=s((1, seq), jnp.float32))
  fn = jax.value_and_grad(lambda hs, ws, ht, wt, b: _mopd(hs, ws, ht, wt, b, cfg), argnums=(0, 1))
  t0 = time.perf_counter()
  mem = jax.jit(fn).lower(h, w, h, w, batch).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend has no memory_analysis")
  return mem.temp_size_in_bytes, time.perf_counter() - t0


def test_chunked_loss_memory_at_8k_by_152k():
  """Loss + gradient for T = 8192, V = 151936 (Qwen3), D = 64, bf16 hidden, chunks of 256.

  A materialised float32 [T, V] logits tensor alone is 4.98 GB. The bound: temp memory below
  8 chunk-sized float32 [C, V] buffers (1.24 GB; measured about 0.67 GB, 2026-11-26, jax 0.10.2
  CPU), and the same within 10% at T = 2048: nothing grows with T * V.
  """
  vocab, chunk = 151936, 256
  temp, secs = _compiled_temp_bytes(8192, vocab, 64, chunk, jnp.bfloat16)
  temp_short, _ = _compiled_temp_bytes(2048, vocab, 64, chunk, jnp.bfloat16)
  full = 8192 * vocab * 4
  print(f"\nchunked MOPD loss+grad T=8192 V={vocab} C={chunk}: temp {temp / 1e6:.1f} MB "
        f"(T=2048: {temp_short / 1e6:.1f} MB; materialised f32 logits: {full / 1e9:.2f} GB); compile {secs:.1f}s")
  assert temp < 8 * chunk * vocab * 4
  assert temp < full / 4
  assert abs(temp - temp_short) < 0.1 * temp_short


# ------------------------------------------------------------------ GPU-shaped kernels


@pytest.mark.parametrize("shape, k", [((6, 49152), 100), ((2, 3, 128256), 100), ((4, 20000), 37),
                                      ((5, 9000), 100), ((3, 1000), 100)])
def test_two_stage_top_k_equals_lax_top_k(shape, k):
  rng = np.random.default_rng(sum(shape) + k)
  x = rng.standard_normal(shape).astype(np.float32)
  # Row 0: the k largest values all inside one block, so a block gives many winners.
  x.reshape(-1, shape[-1])[0, 64:64 + k] = 10.0 + np.arange(k)
  values, ids = jax.jit(lambda a: L.top_k(a, k))(jnp.asarray(x))
  ref_values, ref_ids = jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(values, ref_values)
  np.testing.assert_array_equal(ids, ref_ids)


def test_two_stage_top_k_with_ties_returns_the_same_values():
  x = np.round(np.random.default_rng(1).standard_normal((4, 65536)), 1).astype(np.float32)  # many ties
  values, ids = L.top_k(jnp.asarray(x), 100)
  np.testing.assert_array_equal(values, jax.lax.top_k(jnp.asarray(x), 100)[0])
  np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), -1), values)  # ids name those values
  assert all(len(set(row)) == 100 for row in np.asarray(ids).tolist())


def test_bf16_logits_backward_runs_in_bf16_and_matches_float32():
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((64, 512)) * 0.1, jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((2, 8, 512)), jnp.float32)
  loss = lambda h, w: jnp.sum(L.linear_logits(h, w) * g)
  # Every product in the backward pass takes bfloat16 operands (no float32 / TF32 GEMM).
  def dots(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "dot_general":
        yield e
      for value in e.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          yield from dots(inner)
  found = list(dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr))
  assert len(found) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars), found
  dh, dw = jax.grad(loss, argnums=(0, 1))(h, w)
  rh, rw = jax.grad(loss, argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  for got, ref in ((dh, rh), (dw, rw)):
    ref = np.asarray(ref, np.float64)
    assert np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref) < 1e-2
  np.testing.assert_array_equal(L.linear_logits(h, w),
                                jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32))
