"""Why the main job's losses moved at 1e-6 after #17: the EMA and the optimizer now come from optax.

    python experiments/float_order_refactor.py

On SmolLM2-135M-shaped float32 arrays (random student, teacher and gradients), compares bit for
bit (1) the EMA as the step wrote it before, (1 - rate) * t + rate * s, with
`optax.incremental_update` (rate * s + (1 - rate) * t: XLA contracts the other product into the
fused multiply-add), and (2) one clipped AdamW step behind the old `where(finite, g, 0)` guard
with the same step inside `optax.apply_if_finite` (its `lax.cond` fuses the update differently).
Both differ by at most an ulp; the values agree to float32 precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mopd_jax.models import get_preset, init_model

RATE = 0.05  # configs/default.py's teacher.rate


def arrays(seed: int, shapes, scale: float) -> list[jax.Array]:
  return [jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), s, jnp.float32) * scale
          for i, s in enumerate(shapes)]


def bits_differ(a, b) -> tuple[int, float]:
  """(values whose bits differ, largest absolute difference)."""
  return (sum(int(np.sum(np.asarray(x) != np.asarray(y))) for x, y in zip(a, b)),
          max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b)))


def old_ema(t, s):
  return jax.tree.map(lambda t, s: ((1.0 - RATE) * t + RATE * s).astype(t.dtype), t, s)


def new_ema(t, s):
  return jax.tree.map(lambda n, o: n.astype(o.dtype), optax.incremental_update(s, t, RATE), t)


INNER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-5, weight_decay=0.0))


def old_adam_step(g, p):
  finite = jnp.isfinite(optax.global_norm(g))
  updates, _ = INNER.update(jax.tree.map(lambda x: jnp.where(finite, x, 0.0), g), INNER.init(p), p)
  return optax.apply_updates(p, updates)


def new_adam_step(g, p):
  wrapped = optax.apply_if_finite(INNER, 2**30)
  updates, _ = wrapped.update(g, wrapped.init(p), p)
  return optax.apply_updates(p, updates)


def main() -> None:
  jax.config.update("jax_default_matmul_precision", "highest")
  _, params = nnx.split(nnx.eval_shape(lambda: init_model(get_preset("smollm2-135m"))), nnx.Param)
  shapes = [l.shape for l in jax.tree.leaves(params)]
  student, teacher, grads = arrays(1, shapes, 0.02), arrays(2, shapes, 0.02), arrays(3, shapes, 2e-5)
  total = sum(int(np.prod(s)) for s in shapes)
  n, d = bits_differ(jax.jit(old_ema)(teacher, student), jax.jit(new_ema)(teacher, student))
  print(f"EMA: {n:,} of {total:,} teacher values differ in their bits (max |difference| {d:.2e})")
  n, d = bits_differ(jax.jit(old_adam_step)(grads, student), jax.jit(new_adam_step)(grads, student))
  print(f"AdamW step: {n:,} of {total:,} params differ in their bits (max |difference| {d:.2e})")


if __name__ == "__main__":
  main()
