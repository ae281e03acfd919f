"""Task sources: well-formed Examples, determinism, counts, JSONL/parquet, TFDS round trip."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from mopd_jax.tasks import PromptFormat, get_task, load_task, registered_tasks
from mopd_jax.types import Example, Message
from mopd_jax.verifiers.base import get_verifier, verify_batch, verify_one



def assert_well_formed(examples: list[Example]) -> None:
  assert examples
  ids = [e.example_id for e in examples]
  assert len(set(ids)) == len(ids) and all(ids)
  for e in examples:
    assert isinstance(e, Example)
    assert isinstance(e.prompt, tuple) and e.prompt
    assert all(isinstance(m, Message) and m.role in ("system", "user", "assistant")
               and isinstance(m.content, str) and m.content for m in e.prompt)
    assert e.prompt[-1].role == "user"
    assert e.reference is not None
    assert get_verifier(e.verifier).name == e.verifier


def test_registry():
  assert {"reasoning_gym", "countdown", "humaneval", "bfcl", "jsonl", "tfds"} <= set(
      registered_tasks())
  with pytest.raises(KeyError, match="unknown task 'nope'"):
    get_task("nope")


def test_prompt_format():
  fmt = PromptFormat(system="Be brief.", instruction="Put your final answer in \\boxed{}.")
  assert fmt.messages("What is 1+1?") == (
      Message("system", "Be brief."),
      Message("user", "What is 1+1?\n\nPut your final answer in \\boxed{}."))
  assert PromptFormat().messages("q") == (Message("user", "q"),)
  assert fmt.messages("q", system="")[0].role == "user"


# ------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize("dataset,verifier", [("basic_arithmetic", "math"),
                                              ("chain_sum", "math"),
                                              ("countdown", "reasoning_gym")])
def test_reasoning_gym_examples(dataset, verifier):
  examples = list(load_task("reasoning_gym", dataset=dataset, size=20, seed=7))
  assert len(examples) == 20
  assert_well_formed(examples)
  assert {e.verifier for e in examples} == {verifier}
  # Seeded: the same arguments give the same examples; another seed others.
  assert examples == list(load_task(dataset, size=20, seed=7))
  assert examples != list(load_task(dataset, size=20, seed=8))
  # The generator's own answers verify (in-process here; workers elsewhere).
  for e in examples[:8]:
    if verifier == "math":
      completion = f"Working... so the result is \\boxed{{{e.reference}}}."
    else:
      completion = f"<answer>{e.reference.entry['answer']}</answer>"
    assert verify_one(e, completion).success, (e, completion)


def test_countdown_accepts_other_solutions_and_guards_input():
  (example,) = load_task("countdown", size=1, seed=1)
  answer = example.reference.entry["answer"]
  assert verify_one(example, f"<answer>{answer}</answer>").success
  # Another expression with the target value is also a solution (not string equality).
  other = verify_one(example, f"Done.\n<answer>({answer}) * 1 / 1</answer>")
  assert other.reward < 1.0  # uses numbers 1 that were not given
  assert verify_one(example, f"<answer>(({answer}))</answer>").success
  wrong = verify_one(example, "<answer>1 + 2</answer>")
  assert not wrong.success and 0.0 < wrong.reward < 1.0  # reasoning-gym's partial score
  rejected = verify_one(example, "<answer>__import__('os').getcwd()</answer>")
  assert not rejected.success and "not a plain arithmetic" in rejected.feedback


# ------------------------------------------------------------------------ HumanEval


def test_humaneval_problems():
  from mopd_jax.tasks.humaneval import NUM_PROBLEMS, load_problems

  problems = load_problems()
  assert len(problems) == NUM_PROBLEMS == 164
  assert len({p["task_id"] for p in problems}) == 164
  assert all(p["entry_point"] in p["prompt"] and "def check" in p["test"] for p in problems)


def test_humaneval_examples():
  examples = list(load_task("humaneval"))
  assert len(examples) == 164
  assert_well_formed(examples)
  assert {e.verifier for e in examples} == {"code"}
  assert examples[0].example_id == "HumanEval/0"


def _humaneval_completion(example: Example, body: str) -> str:
  return f"Here it is.\n```python\n{example.metadata['prompt_code']}{body}\n```"


@pytest.mark.slow
def test_humaneval_acceptance_canonical_pass_return_none_fails():
  """All 164 canonical solutions pass and 164 `return None` fail, in <= 60 s on 2 workers.

  The 60 s budget is for 2 free cores; on a machine already loaded by others (load average
  above the core count before the test) it scales with that load, and the test prints both.
  """
  cores = len(os.sched_getaffinity(0))
  load_before = os.getloadavg()[0]
  budget = 60.0 * max(1.0, load_before / cores)
  examples = list(load_task("humaneval"))
  completions = ([_humaneval_completion(e, e.metadata["canonical_solution"]) for e in examples]
                 + [_humaneval_completion(e, "    return None\n") for e in examples])
  start = time.monotonic()
  verdicts = verify_batch(examples + examples, completions, num_workers=2, deadline_s=60.0)
  elapsed = time.monotonic() - start
  print(f"HumanEval acceptance: {len(verdicts)} verdicts in {elapsed:.1f} s "
        f"(load average before: {load_before:.1f} on {cores} cores, budget {budget:.0f} s)")
  failed = [(e.example_id, v.feedback[:200]) for e, v in zip(examples, verdicts[:164])
            if not v.success]
  assert not failed, failed[:5]
  passed = [e.example_id for e, v in zip(examples, verdicts[164:]) if v.success or v.reward]
  assert not passed, passed[:5]
  assert elapsed <= budget, f"{elapsed:.1f} s > {budget:.0f} s"


# ----------------------------------------------------------------------------- BFCL


@pytest.mark.parametrize("category,count,calls", [("simple", 400, {1}),
                                                  ("multiple", 200, {1}),
                                                  ("parallel", 200, {2, 3, 4, 6, 8})])
def test_bfcl_examples(category, count, calls):
  examples = list(load_task("bfcl", category=category))
  assert len(examples) == count
  assert_well_formed(examples)
  assert {len(e.reference.ground_truth) for e in examples} == calls
  for e in examples:
    assert e.prompt[0].role == "system"
    assert all(f["name"] in e.prompt[0].content for f in e.reference.functions)
  if category == "multiple":
    assert all(len(e.reference.functions) >= 2 for e in examples)


def test_bfcl_unknown_category():
  with pytest.raises(ValueError, match="unknown BFCL category"):
    list(load_task("bfcl", category="nope"))


# ---------------------------------------------------------------------- JSONL/parquet

ROWS = [
    {"id": "a", "prompt": "What is 2+3?", "verifier": "math", "reference": 5,
     "metadata": {"level": 1}},
    {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Pick."}],
     "verifier": "multiple_choice", "reference": {"answer": "B", "letters": "ABC"}},
    {"prompt": "Call f.", "system": "You call tools.", "verifier": "tool_call",
     "reference": {"ground_truth": [{"f": {"x": [1]}}]}},
    {"id": "d", "prompt": "Pick one.", "verifier": "multiple_choice", "reference": "C"},
]


def _write_jsonl(path, rows) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_jsonl_examples(tmp_path):
  path = tmp_path / "data.jsonl"
  _write_jsonl(path, ROWS)
  fmt = PromptFormat(instruction="Answer briefly.")
  examples = list(load_task("jsonl", path=path, prompt_format=fmt))
  assert_well_formed(examples)
  assert [e.example_id for e in examples] == ["a", "data/1", "data/2", "d"]
  assert examples[0].reference == "5" and examples[0].metadata == {"level": 1}
  assert examples[0].prompt == (Message("user", "What is 2+3?\n\nAnswer briefly."),)
  assert examples[1].prompt[0] == Message("system", "S")
  assert examples[2].prompt[0] == Message("system", "You call tools.")
  completions = ["\\boxed{5}", "\\boxed{B}", "f(x=1)", "(C)"]
  assert all(v.success for v in verify_batch(examples, completions, num_workers=2))


def test_jsonl_code_reference(tmp_path):
  path = tmp_path / "code.jsonl"
  _write_jsonl(path, [{"prompt": "Write add(a, b).", "verifier": "code",
                       "reference": {"style": "call", "entry_point": "add",
                                     "calls": [[[1, 2], 3], [[5, 0], 5]]}}])
  (example,) = load_task("jsonl", path=path)
  good = "```python\ndef add(a, b):\n  return a + b\n```"
  bad = "```python\ndef add(a, b):\n  return a - b\n```"
  verdicts = verify_batch([example, example], [good, bad], num_workers=2)
  assert verdicts[0].success and not verdicts[1].success and verdicts[1].reward == 0.5


@pytest.mark.parametrize("row,message", [
    ({"verifier": "math", "reference": "1"}, "row 0: missing field 'prompt'"),
    ({"prompt": "q", "reference": "1"}, "missing field 'verifier'"),
    ({"prompt": "q", "verifier": "math"}, "missing field 'reference'"),
    ({"prompt": "q", "verifier": "multiple_choice", "reference": {"answer": "Z"}},
     "bad 'reference'"),
])
def test_jsonl_errors_name_the_field(tmp_path, row, message):
  path = tmp_path / "bad.jsonl"
  _write_jsonl(path, [row])
  with pytest.raises(ValueError, match=message):
    list(load_task("jsonl", path=path))


def test_parquet_examples(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  table = pa.table({
      "id": [row.get("id") for row in ROWS],
      "prompt": [row["prompt"] if isinstance(row["prompt"], str) else None for row in ROWS],
      "verifier": [row["verifier"] for row in ROWS],
      "reference_json": [json.dumps(row["reference"]) for row in ROWS],
      "system": [row.get("system") for row in ROWS],
  })
  keep = [i for i, row in enumerate(ROWS) if isinstance(row["prompt"], str)]
  pq.write_table(table.take(keep), tmp_path / "data.parquet")
  examples = list(load_task("parquet", path=tmp_path / "data.parquet"))
  jsonl = tmp_path / "data.jsonl"
  _write_jsonl(jsonl, [ROWS[i] for i in keep])
  expected = list(load_task("jsonl", path=jsonl))
  assert [(e.prompt, e.reference, e.verifier) for e in examples] == [
      (e.prompt, e.reference, e.verifier) for e in expected]


# ------------------------------------------------------------------------------ TFDS


def test_tfds_round_trip_with_process_split(tmp_path):
  rows = [{"id": f"q{i}", "prompt": f"What is {i}+1?", "verifier": "math",
           "reference": str(i + 1)} for i in range(10)] + ROWS[1:]
  jsonl = tmp_path / "train.jsonl"
  _write_jsonl(jsonl, rows)
  data_dir = tmp_path / "tfds"
  expected = list(load_task("jsonl", path=jsonl))
  shards = [list(load_task("tfds", jsonl_path=jsonl, data_dir=data_dir, process_index=i,
                           process_count=3)) for i in range(3)]
  assert sorted(len(s) for s in shards) == [4, 4, 5]  # 13 rows, none dropped
  assert [e for shard in shards for e in shard] == expected  # disjoint, file order
  assert list(data_dir.rglob("*.array_record*")), "not stored as array_record"
  # Reading again reuses the prepared files; editing the JSONL prepares a new version.
  start = time.monotonic()
  assert list(load_task("tfds", jsonl_path=jsonl, data_dir=data_dir, process_index=0,
                        process_count=1)) == expected
  assert time.monotonic() - start < 30
  _write_jsonl(jsonl, rows[:3])
  assert len(list(load_task("tfds", jsonl_path=jsonl, data_dir=data_dir, process_index=0,
                            process_count=1))) == 3
  assert "tensorflow" not in sys.modules
