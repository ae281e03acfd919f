"""Walking jaxprs in tests: every equation, those of sub-jaxprs (scan, while, remat bodies) included."""

import jax


def all_equations(jaxpr) -> list:
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          out += all_equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          out += all_equations(sub)
  return out
