"""Entry point: `python -m mopd_jax.main [--config=configs/x.py:arg] [--config.a.b=value ...]`.

Without --config it runs the main job (configs/default.py).
"""

from __future__ import annotations

import os


def _main(config) -> None:
  from mopd_jax import trainer
  from mopd_jax.logging_lib import quiet_library_logs

  quiet_library_logs()
  summary = trainer.train(config)
  print(f"\n[mopd] finished {summary.steps} steps; logs in {summary.log_dir}")
  if summary.before is not None and summary.after is not None:
    b, a = summary.before, summary.after
    print(f"[mopd] held-out mean@{a.k} over {a.num_prompts} prompts: before {100 * b.mean_at_k:.1f}%  ->  "
          f"after {100 * a.mean_at_k:.1f}%  ({100 * (a.mean_at_k - b.mean_at_k):+.1f} points)")


def run() -> None:
  # Flags are defined here, not at import: verifier worker processes re-import this module
  # as __mp_main__ and must not define them twice.
  from absl import app
  from ml_collections import config_flags

  import configs

  default = os.path.join(os.path.dirname(configs.__file__), "default.py")
  config = config_flags.DEFINE_config_file("config", default, "Run configuration (a get_config file).",
                                           lock_config=True)
  app.run(lambda argv: _main(config.value))


if __name__ == "__main__":
  run()
