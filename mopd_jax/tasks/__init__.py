"""Task sources: named functions that yield `Example`s, and prompt formatting.

A task source is a function `(**options) -> Iterator[Example]` registered by name:

  examples = load_task("reasoning_gym", dataset="countdown", size=64, seed=0)
  examples = load_task("humaneval")
  examples = load_task("bfcl", category="parallel")
  examples = load_task("jsonl", path="data/train.jsonl")
  examples = load_task("tfds", jsonl_path="data/train.jsonl", data_dir="/tmp/tfds")

Each source takes a `prompt_format` (a `PromptFormat`) to override its default system
prompt and answer-format instruction. Built-in sources are imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator

from mopd_jax.types import Example, Message

TaskSource = Callable[..., Iterator[Example]]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a task's question becomes chat messages.

  `system`: the system prompt ("" for none). `instruction`: appended to the user message
  after a blank line, telling the model how to present its answer ("" for none).
  """

  system: str = ""
  instruction: str = ""

  def messages(self, question: str, *, system: str | None = None) -> tuple[Message, ...]:
    """The prompt for `question`; `system` (e.g. a per-example one) overrides the format's."""
    system = self.system if system is None else system
    user = question.rstrip()
    if self.instruction:
      user = f"{user}\n\n{self.instruction}"
    head = (Message("system", system),) if system else ()
    return head + (Message("user", user),)


# Sensible defaults per kind of task (sources use these unless given another format).
MATH_FORMAT = PromptFormat(instruction="Put your final answer in \\boxed{}.")
TAGGED_ANSWER_FORMAT = PromptFormat(
    instruction="Give only your final answer inside <answer></answer> tags, e.g. "
                "<answer>your answer</answer>.")
MULTIPLE_CHOICE_FORMAT = PromptFormat(
    instruction="Answer with the letter of the correct option, as \\boxed{X}.")
CODE_FORMAT = PromptFormat(
    instruction="Complete the function. Reply with the whole function (signature included) "
                "in one ```python code block.")
TOOL_CALL_FORMAT = PromptFormat(
    system="You are an expert in composing function calls. You are given a question and a "
           "set of possible functions. Based on the question, make one or more function "
           "calls to achieve the purpose. Reply with the call(s) only, in the format "
           "[func_name1(param_name1=value1, param_name2=value2), func_name2(param=value)].\n\n"
           "Here is a list of functions in JSON format that you can invoke:\n{functions}")


# ------------------------------------------------------------------------- registry

_TASKS: dict[str, TaskSource] = {}

BUILTIN_TASK_MODULES: dict[str, str] = {
    "reasoning_gym": "mopd_jax.tasks.reasoning_gym",
    "basic_arithmetic": "mopd_jax.tasks.reasoning_gym",
    "chain_sum": "mopd_jax.tasks.reasoning_gym",
    "countdown": "mopd_jax.tasks.reasoning_gym",
    "humaneval": "mopd_jax.tasks.humaneval",
    "bfcl": "mopd_jax.tasks.bfcl",
    "jsonl": "mopd_jax.tasks.jsonl",
    "parquet": "mopd_jax.tasks.jsonl",
    "tfds": "mopd_jax.tasks.tfds_source",
}


def register_task(name: str) -> Callable[[TaskSource], TaskSource]:
  """Decorator registering a task source under `name`."""

  def decorator(source: TaskSource) -> TaskSource:
    old = _TASKS.get(name)
    if old is not None and getattr(old, "__qualname__", None) != getattr(
        source, "__qualname__", None):
      raise ValueError(f"task {name!r} is already registered ({old!r})")
    _TASKS[name] = source
    return source

  return decorator


def get_task(name: str) -> TaskSource:
  """The task source registered as `name`, importing a built-in one on first use."""
  if name not in _TASKS and name in BUILTIN_TASK_MODULES:
    importlib.import_module(BUILTIN_TASK_MODULES[name])
  if name not in _TASKS:
    known = sorted(set(_TASKS) | set(BUILTIN_TASK_MODULES))
    raise KeyError(f"unknown task {name!r}; known tasks: {known}")
  return _TASKS[name]


def load_task(name: str, **options: Any) -> Iterator[Example]:
  """Examples of task `name` (see each source for its options)."""
  return get_task(name)(**options)


def registered_tasks() -> tuple[str, ...]:
  return tuple(sorted(set(_TASKS) | set(BUILTIN_TASK_MODULES)))
