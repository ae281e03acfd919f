"""Methods are registered objects: the docs' example registers one in one place and trains; the
train step and the configuration never branch on a method's name."""

import ast
import dataclasses
import json
import pathlib
import re
import types

import jax
import numpy as np
import pytest

from config_tools import override
from configs import default as default_config
from mopd_jax import config_lib, losses, methods, trainer
from mopd_jax.train_step import StepConfig, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ADDING_A_METHOD.md"


@pytest.fixture
def reinforce():
  """The docs' example, executed as written; unregistered afterwards."""
  code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
  module = types.ModuleType("adding_a_method_example")
  exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102  (our own docs)
  yield module
  methods.METHODS.pop("reinforce", None)


def tiny(method, **overrides):
  c = default_config.get_config(f"tiny,method={method}")
  c.eval.at_start = c.eval.at_end = False
  return override(c, overrides)


def test_the_docs_example_is_one_registration_and_is_what_the_step_runs(reinforce):
  c = tiny("reinforce")
  config_lib.validate(c, num_devices=8)
  step_cfg = trainer.step_config(c)
  assert isinstance(step_cfg.method, reinforce.Reinforce) and step_cfg.method.name == "reinforce"
  assert step_cfg.method.second_model is None and config_lib.learning_rate(c) == c.optim.lr

  from test_train_step import _batch, _setup  # the step tests' tiny model and batch

  step_cfg = StepConfig(method=step_cfg.method, group_size=4)
  model_cfg, graphdef, opt, lr_fn, state, teacher = _setup(step_cfg)
  batch = _batch(model_cfg)
  values = step_cfg.method.per_token_values(methods.Models(graphdef), state.params, batch, None)
  adv = np.asarray(batch.rewards).reshape(-1, 4)
  adv = (adv - adv.mean(1, keepdims=True)).reshape(-1)
  mask = np.asarray(batch.response_mask)
  expected = float(np.sum(-adv[:, None] * np.asarray(values.logp) * mask) / mask.sum())
  new_state, _, metrics = jax.jit(make_train_step(graphdef, opt, step_cfg, learning_rate_fn=lr_fn))(
      state, teacher, batch, jax.random.key(0))
  np.testing.assert_allclose(float(metrics.loss), expected, rtol=1e-5)
  assert float(metrics.update_applied) == 1.0 and float(metrics.method.mean_abs_advantage) > 0
  assert np.isnan(float(metrics.teacher_alignment_auc))  # no teacher scores


@pytest.mark.slow
def test_the_docs_example_trains_through_the_trainer(reinforce, tmp_path):
  summary = trainer.train(tiny("reinforce", **{"logging.dir": str(tmp_path), "train.steps": 2}))
  assert summary.steps == 2
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(r["loss"]) and "method/mean_abs_advantage" in r for r in rows)


def test_registering_a_name_twice_is_refused(reinforce):
  with pytest.raises(ValueError, match="'reinforce' is already registered"):
    methods.register(reinforce.Reinforce("reinforce"))


def test_unknown_method_names_the_known_ones():
  with pytest.raises(config_lib.ConfigError, match=r"config.method: unknown method 'ppo'; known: \['dpo', "):
    methods.get("ppo")


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_registered_method_reads_its_options_from_the_config(name):
  """A method's typed options come from its own section; defaults equal the typed defaults."""
  method = methods.from_config(tiny(name))
  assert method.name == name and isinstance(method, methods.Method)
  hash(method)  # static under jit
  if isinstance(method, methods.Distillation):
    assert method.distill.alpha == 0.5 and method.peer_preset
  if isinstance(method, methods.GRPO):
    assert method.grpo == dataclasses.replace(losses.GRPOConfig(), agg_norm=method.grpo.agg_norm)


def _code_strings(path: pathlib.Path) -> set[str]:
  """String constants and names used in a module's code (docstrings excluded)."""
  tree = ast.parse(path.read_text())
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
      out.add(node.value)
    elif isinstance(node, ast.Attribute):
      out.add(node.attr)
    elif isinstance(node, ast.Name):
      out.add(node.id)
  return out


def test_the_train_step_and_the_trainer_never_branch_on_a_method():
  names = set(methods.METHODS) | {"distill", "sft", "ema", "trust_region", "frozen", "external"}
  for module in ("train_step.py", "trainer.py"):
    used = _code_strings(REPO / "mopd_jax" / module) & names
    assert not used, f"mopd_jax/{module} names methods or teacher modes: {sorted(used)}"
  for module in ("train_step.py",):
    used = _code_strings(REPO / "mopd_jax" / module) & {"teacher_mode", "grpo", "dpo", "simpo", "distill"}
    assert not used, f"mopd_jax/{module} reads method options: {sorted(used)}"


def test_config_lib_does_not_import_the_train_step():
  tree = ast.parse((REPO / "mopd_jax" / "config_lib.py").read_text())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names} | {
      n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert "train_step" not in imported and "mopd_jax.train_step" not in imported
