"""Smoke run: tiny random model, real tokenizer and verifier, 3 steps (< 2 minutes on CPU).

    python -m mopd_jax.main --config=configs/tiny.py:method=sdpo
"""

from configs import default
from mopd_jax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, method="mopd")
  return default.get_config(f"tiny,method={a.method}")
