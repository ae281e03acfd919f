"""BFCL function-calling tasks (simple, multiple, parallel), read from the `bfcl-eval` package.

The package ships the questions (`bfcl_eval/data/BFCL_v4_<category>.json`) and their
possible answers (`bfcl_eval/data/possible_answer/...`), one JSON object per line; they are
read locally (no network, `bfcl_eval` itself is not imported: its package init pulls in
model SDKs). Categories: "simple" (= BFCL's simple_python, 400), "multiple" (200: one call,
several functions offered), "parallel" (200: several calls of one function, any order).

Each Example: the function descriptions in the system prompt (TOOL_CALL_FORMAT's
`{functions}`), the question as user message(s), verifier "tool_call", reference a
`ToolCallReference` (ground truth, functions, ordered=False as in BFCL).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any, Iterator

from mopd_jax.tasks import TOOL_CALL_FORMAT, PromptFormat, register_task
from mopd_jax.types import Example, Message
from mopd_jax.verifiers.tool_call import ToolCallReference

CATEGORIES: dict[str, str] = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
}


def bfcl_data_dir() -> pathlib.Path:
  """`bfcl_eval/data` in site-packages, found without importing the package."""
  spec = importlib.util.find_spec("bfcl_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package bfcl-eval is not installed (pip install bfcl-eval)")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load_category(category: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """(question record, possible-answer record) pairs of one category, matched by id."""
  if category not in CATEGORIES:
    raise ValueError(f"unknown BFCL category {category!r}; choose from {sorted(CATEGORIES)}")
  name = CATEGORIES[category]
  data = bfcl_data_dir()
  questions = _read_jsonl(data / f"BFCL_v4_{name}.json")
  answers = {a["id"]: a for a in _read_jsonl(data / "possible_answer" / f"BFCL_v4_{name}.json")}
  missing = [q["id"] for q in questions if q["id"] not in answers]
  if missing:
    raise ValueError(f"BFCL {category}: no possible answer for {missing[:5]}")
  return [(q, answers[q["id"]]) for q in questions]


@register_task("bfcl")
def bfcl_examples(category: str = "simple", *,
                  prompt_format: PromptFormat | None = None) -> Iterator[Example]:
  """The Examples of one BFCL category, in the file's order."""
  fmt = prompt_format or TOOL_CALL_FORMAT
  for question, answer in load_category(category):
    functions = tuple(question["function"])
    system = fmt.system.replace("{functions}", json.dumps(list(functions), indent=1))
    turn = question["question"][0]  # these categories are single-turn
    prompt: tuple[Message, ...] = (Message("system", system),) if system else ()
    for message in turn:
      content = message["content"]
      if message["role"] == "user" and fmt.instruction:
        content = f"{content}\n\n{fmt.instruction}"
      prompt += (Message(message["role"], content),)
    reference = ToolCallReference(ground_truth=tuple(answer["ground_truth"]),
                                  functions=functions, ordered=False)
    yield Example(prompt=prompt, reference=reference, verifier="tool_call",
                  metadata={"task": "bfcl", "category": category},
                  example_id=f"bfcl/{question['id']}")
