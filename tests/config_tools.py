"""Setting config fields by dotted name in tests: {"data.eval_size": 0, "loss.alpha": 1.0}."""

from typing import Any, Mapping


def override(config, overrides: Mapping[str, Any]):
  """`config` with each dotted field set (unlocked: a test may add what a config lacks)."""
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config
