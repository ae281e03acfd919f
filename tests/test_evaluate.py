"""Evaluation: pass@k / mean@k / diversity summaries, outputs, orbax checkpoints, a tiny run."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from mopd_jax import checkpointing, evaluate, rollouts
from mopd_jax.passk import pass_at_k
from mopd_jax.train_step import TeacherState, init_train_state, make_optimizer
from mopd_jax.types import Message


def _group(i: int, successes: list[bool], texts: list[str] | None = None) -> rollouts.RolloutGroup:
  texts = texts or [f"answer {i} {j}" for j in range(len(successes))]
  return rollouts.RolloutGroup(
      example_id=f"ex{i}", prompt=(Message("user", f"q{i}"),), responses=tuple(texts),
      rewards=tuple(float(s) for s in successes), successes=tuple(successes),
      response_tokens=tuple((1,) * (j + 1) for j in range(len(successes))),
      finish_reasons=("stop",) * (len(successes) - 1) + ("length",))


def test_default_ks():
  assert evaluate.default_ks(8) == (1, 2, 4, 8)
  assert evaluate.default_ks(6) == (1, 2, 4, 6)
  assert evaluate.default_ks(1) == (1,)


def test_summary_pass_at_k_mean_and_diversity(tmp_path):
  groups = [_group(0, [True, False, False, False]), _group(1, [False] * 4),
            _group(2, [True] * 4, texts=["same words here"] * 4)]
  summary, items = evaluate.summarize(groups, (1, 2, 4), checkpoint="ckpt", task="t", temperature=1.0,
                                      max_new_tokens=8)
  assert summary.mean_at_k == pytest.approx(np.mean([0.25, 0.0, 1.0]))
  for p in summary.pass_at_k:
    assert p.pass_at_k == pytest.approx(np.mean([pass_at_k(4, c, p.k) for c in (1, 0, 4)]))
  assert [i.pass_at for i in items][0] == pytest.approx((0.25, 0.5, 1.0))
  assert summary.mean_response_tokens == pytest.approx(2.5)
  assert summary.length_finish_frac == pytest.approx(0.25)
  assert items[2].diversity.jaccard_similarity == 1.0 and items[2].diversity.distinct_1 == pytest.approx(0.25)
  assert summary.diversity.n_groups == 3
  paths = evaluate.write_results(tmp_path, summary, items)
  # items.jsonl is a rollout dump (readable by the teacher-signal analysis) with extras.
  assert rollouts.read_rollouts(paths.items) == groups
  first = json.loads(paths.items.read_text().splitlines()[0])
  assert first["pass_at_k"]["2"] == pytest.approx(0.5) and first["n_success"] == 1
  assert set(first["diversity"]) >= {"distinct_1", "distinct_2", "jaccard_similarity", "edit_similarity"}
  data = json.loads(paths.json.read_text())
  assert data["pass_at_k"]["4"] == pytest.approx(2 / 3) and data["ks"] == [1, 2, 4]
  assert "pass@4" in paths.markdown.read_text()


def test_one_sample_per_item_writes_null_similarity(tmp_path):
  summary, items = evaluate.summarize([_group(0, [True]), _group(1, [False])], (1,), checkpoint="c", task="t",
                                      temperature=0.0, max_new_tokens=4)
  assert math.isnan(summary.diversity.jaccard_similarity)
  paths = evaluate.write_results(tmp_path, summary, items)
  assert json.loads(paths.json.read_text())["diversity"]["jaccard_similarity"] is None


def _tiny_eval_config(tmp_path):
  c = evaluate_config.get_config("tiny")
  c.evaluate.out_dir = str(tmp_path / "eval")
  return c


def _save_run_checkpoint(directory, student, teacher, step: int = 7) -> None:
  """A trainer run's checkpoint of these params, as `trainer.train` writes it."""
  optimizer, _ = make_optimizer(1e-3)
  ckpt = checkpointing.RunCheckpointer(directory, async_save=False)
  arrays = {"state": init_train_state(student, optimizer), "teacher": TeacherState(teacher),
            "rng": jax.random.key_data(jax.random.key(0))}
  ckpt.save(step, arrays, checkpointing.RunPosition(step=step, data_position=0))
  ckpt.close()


def test_restores_params_from_a_trainer_run_checkpoint(tmp_path):
  config = _tiny_eval_config(tmp_path)
  graphdef, like, _, _ = evaluate.load_model(config)  # the run's structure (tiny-llama, SmolLM2 vocab)
  trained = jax.tree.map(lambda x: x + 1.0, like)
  _save_run_checkpoint(tmp_path / "run", trained, like)
  _, student, _, description = evaluate.load_model(config, str(tmp_path / "run"))
  _, teacher, _, _ = evaluate.load_model(config, str(tmp_path / "run"), which="teacher")
  assert "step 7" in description
  for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(like)):
    np.testing.assert_array_equal(a, b)
  checkpointing.save_params(tmp_path / "params", trained)
  _, restored, _, _ = evaluate.load_model(config, str(tmp_path / "params"))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)


def test_a_run_checkpoint_whose_params_fail_their_checksum_is_refused_naming_the_tensor(tmp_path):
  config = _tiny_eval_config(tmp_path)
  _, like, _, _ = evaluate.load_model(config)
  _save_run_checkpoint(tmp_path / "run", like, like)
  # What bit rot in that tensor's chunk looks like to the reader: its bytes no longer hash to the record.
  path = tmp_path / "run" / "7" / "checksums" / "metadata"
  record = json.loads(path.read_text())
  name = "state.params.layers.mlp.gate_up_proj.kernel.value"
  record["arrays"][name]["digest"] = "0123456789abcdef"
  path.write_text(json.dumps(record))
  with pytest.raises(checkpointing.CheckpointCorruptError, match=rf"step 7 is damaged: {name}: digest mismatch"):
    evaluate.load_model(config, str(tmp_path / "run"))
  _, teacher, _, _ = evaluate.load_model(config, str(tmp_path / "run"), which="teacher")  # its tensors are intact
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(like)):
    np.testing.assert_array_equal(a, b)


def test_tiny_evaluation_end_to_end(tmp_path):
  config = _tiny_eval_config(tmp_path)
  summary, items, paths = evaluate.evaluate(config)
  assert summary.num_items == 4 and summary.num_samples == 2 and summary.ks == (1, 2)
  assert len(items) == 4 and all(len(i.group) == 2 for i in items)
  assert 0.0 <= summary.pass_at_k[1].pass_at_k <= 1.0
  assert len(paths.items.read_text().splitlines()) == 4
