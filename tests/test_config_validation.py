"""config_lib.validate rejects every bad field before any compute, naming it.

Table-driven: each leaf of `base_config()` has a rule in `config_lib.FIELD_RULES`; the property
test below sets clearly bad values (by the default's type) on every leaf that exists when it
runs, so a field added later without a rule fails `test_every_field_has_a_rule`.
"""

import math
import re

import ml_collections
import pytest

from mopd_jax import config_lib, methods, rollouts, trainer  # noqa: E402
from mopd_jax.weights import loading as model_loading

# Sub-dicts passed as keyword options to a registry entry (peers.get_preset, the task loader),
# which validates them itself: their keys are free-form, so they are leaves here.
FREE_FORM = {"mopd.overrides", "data.options"}


def _leaves(c, prefix=""):
  for key in sorted(c.keys()):
    name = prefix + key
    if isinstance(c[key], ml_collections.ConfigDict) and name not in FREE_FORM:
      yield from _leaves(c[key], name + ".")
    else:
      yield name, c[key]


def _set(c, field, value):
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with c.ignore_type():
    node[leaf] = value


def _raises_naming(c, field, **kwargs):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, **kwargs)
  assert str(e.value).startswith(f"config.{field}: "), (field, str(e.value))
  return str(e.value)


def test_the_base_config_validates():
  config_lib.validate(config_lib.base_config(), num_devices=8)


# ----------------------------------------------------------------------------- the reported cases


@pytest.mark.parametrize("field, value", [
    ("mesh.data", 0), ("mesh.fsdp", 0), ("mesh.tensor", -2), ("mesh.data", 1.5),
    ("data.train_size", 0), ("data.eval_size", -1),
    ("sampling.max_new_tokens", 0), ("eval.max_new_tokens", 0),
    ("checkpoint.every", 0), ("checkpoint.keep", 0),
    ("verifier.deadline_s", -1.0), ("verifier.deadline_s", 0.0), ("verifier.deadline_s", math.nan),
    ("verifier.deadline_s", math.inf), ("verifier.num_workers", 0),
    ("optim.lr", math.inf), ("optim.lr", math.nan), ("optim.lr", -1e-5), ("optim.preference_lr", math.inf),
    ("optim.warmup_steps", -1), ("optim.weight_decay", -0.1), ("optim.grad_clip", -1.0),
    ("optim.b1", 1.0), ("optim.b1", -0.1), ("optim.b2", 1.0), ("optim.b2", 1.5), ("optim.eps", math.nan),
])
def test_reported_bad_values_fail_in_validate_naming_the_field(field, value):
  c = config_lib.base_config()
  _set(c, field, value)
  _raises_naming(c, field, num_devices=8)


def test_continuous_refill_settings_are_checked_against_the_mesh_and_processes():
  c = config_lib.base_config()
  c.sampling.decode_rows = 64
  config_lib.validate(c, num_devices=8)  # 64 rows over the 8 batch shards
  assert rollouts.sampling_params(c, temperature=1.0, max_new_tokens=8).decode_rows == 64
  c.sampling.decode_rows = 12
  assert "not divisible by the data x fsdp mesh size 8" in _raises_naming(c, "sampling.decode_rows", num_devices=8)
  c.sampling.decode_rows, c.sampling.refill_free_rows = 16, 17
  assert "exceeds sampling.decode_rows=16" in _raises_naming(c, "sampling.refill_free_rows", num_devices=8)
  c.sampling.refill_free_rows = 0
  c.distributed.enabled, c.distributed.num_processes = True, 2
  assert "runs in one process" in _raises_naming(c, "sampling.decode_rows", num_devices=8)
  c = config_lib.base_config()  # off by default: the one-batch decoder
  assert rollouts.sampling_params(c, temperature=1.0, max_new_tokens=8).decode_rows is None


def test_mesh_allows_one_inferred_axis_only():
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp = -1, -1
  assert "at most one" in _raises_naming(c, "mesh", num_devices=8)


def test_bad_config_fails_in_setup_before_any_model_loads(monkeypatch):
  c = config_lib.base_config()
  c.mesh.data = 0  # was a ZeroDivisionError inside validate
  monkeypatch.setattr(model_loading, "load_model_and_tokenizer",
                      lambda *a, **k: pytest.fail("validation must fail before models load"))
  with pytest.raises(config_lib.ConfigError, match=r"^config\.mesh\.data: "):
    trainer.setup(c)


# ----------------------------------------------------------------------------- every field


def test_every_field_has_one_rule_and_no_rule_is_stale():
  """A field is validated once: by FIELD_RULES, or (the method sections) by the typed options
  of the methods that read it."""
  leaves = {name for name, _ in _leaves(config_lib.base_config())}
  by_methods = methods.config_fields()
  missing = sorted(leaves - set(config_lib.FIELD_RULES) - by_methods)
  assert not missing, f"add a rule to config_lib.FIELD_RULES (or a method's typed options) for {missing}"
  stale = sorted((set(config_lib.FIELD_RULES) | by_methods) - leaves)
  assert not stale, f"rules for fields base_config() no longer has: {stale}"
  twice = sorted(set(config_lib.FIELD_RULES) & by_methods)
  assert not twice, f"validated twice (FIELD_RULES and a method's options): {twice}"


# Fields where any value of the right type is valid (only the type is checked): paths and
# names resolved when the run loads them, and free-form option dicts.
ANY_VALUE_OF_ITS_TYPE = {
    "model.checkpoint",  # HF dir, .gguf file, "smollm2-gguf" or "" (random init): opened by the loader
    "model.tokenizer", "teacher.external_checkpoint",
    "checkpoint.dir", "logging.dir", "distributed.coordinator_address",
    "mopd.overrides", "data.options",  # validated by peers.get_preset / the task's loader
}


# Numeric fields where None is a documented value ("off"): None is not a bad value for them.
NONE_MEANS_OFF = {"loss.is_clip", "loss.agg_norm", "loss.mismatch", "grpo.clip_c", "loss.top_k", "sampling.top_k"}


def _bad_values(default):
  """Clearly bad values for a field, from its default's type."""
  if isinstance(default, bool):
    return ["yes", 1, None]
  if isinstance(default, int):
    return [True, "3", 2.5, math.nan, -10**9]
  if isinstance(default, float):
    return ["0.5", None, math.nan, math.inf, -math.inf, -1e9]
  if isinstance(default, str):
    return [3, None, "no-such-value-\u00a4"]
  if isinstance(default, tuple):
    return [5, "abc", (object(),)]
  if isinstance(default, ml_collections.ConfigDict):
    return [5, "abc"]
  raise AssertionError(f"no bad values for {default!r}")


@pytest.mark.parametrize("field, default", list(_leaves(config_lib.base_config())))
def test_every_field_rejects_clearly_bad_values_naming_itself(field, default):
  values = _bad_values(default)
  if field in ANY_VALUE_OF_ITS_TYPE:
    values = [v for v in values if not isinstance(v, type(default))]  # only the wrong types
  if field in NONE_MEANS_OFF:
    values = [v for v in values if v is not None]
  for value in values:
    c = config_lib.base_config()
    _set(c, field, value)
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(c, num_devices=8)
    assert re.match(rf"config\.{re.escape(field)}(\.|:| )", str(e.value)), (field, value, str(e.value))
