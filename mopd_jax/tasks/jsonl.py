"""Examples from JSONL or parquet files.

Schema: one JSON object per line (or one parquet row) with fields

  prompt     str | list of {"role": str, "content": str}   required
             A string is the user message; the prompt format's instruction is appended
             to it. A message list is used as given.
  verifier   str        required (unless the loader gets `verifier=`): a registered
             verifier name ("math", "multiple_choice", "tool_call", "code", ...).
  reference  any JSON   required: what the verifier checks against, decoded per verifier:
               math            the gold answer (converted to str)
               multiple_choice "C" or {"answer": "C", "letters": "ABCD"}
               tool_call       {"ground_truth": [{f: {arg: [values]}}], "functions": [...],
                                "ordered": false}
               code            the fields of `CodeTests` (`CodeTests.from_mapping`)
               reasoning_gym   {"dataset": ..., "entry": {...}, "config": {...}}
             other verifiers receive the JSON value unchanged.
  system     str        optional system prompt (overrides the format's; ignored when the
             prompt is a message list that already starts with a system message)
  id         str        optional example id (default "<file stem>/<row index>")
  metadata   object     optional, kept in `Example.metadata`
  reference_json, metadata_json   str   optional JSON-encoded alternatives to `reference`
             and `metadata` (for parquet, where one column cannot mix strings and structs)

Example line:
  {"id": "q1", "prompt": "What is 2+3?", "verifier": "math", "reference": "5"}
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping

from mopd_jax.tasks import PromptFormat, register_task
from mopd_jax.types import Example, Message


def _math_reference(value: Any) -> str:
  return str(value)


def _choice_reference(value: Any) -> Any:
  from mopd_jax.verifiers.multiple_choice import ChoiceReference

  return ChoiceReference(**value) if isinstance(value, Mapping) else str(value)


def _tool_call_reference(value: Any) -> Any:
  from mopd_jax.verifiers.tool_call import ToolCallReference

  return ToolCallReference(ground_truth=tuple(value["ground_truth"]),
                           functions=tuple(value.get("functions", ())),
                           ordered=bool(value.get("ordered", False)))


def _code_reference(value: Any) -> Any:
  from mopd_jax.verifiers.code import CodeTests

  return CodeTests.from_mapping(value) if isinstance(value, Mapping) else value


def _reasoning_gym_reference(value: Any) -> Any:
  from mopd_jax.tasks.reasoning_gym import ReasoningGymReference

  return ReasoningGymReference(**value) if isinstance(value, Mapping) else value


# Verifier name -> JSON value to the reference type that verifier expects.
REFERENCE_DECODERS: dict[str, Callable[[Any], Any]] = {
    "math": _math_reference,
    "multiple_choice": _choice_reference,
    "tool_call": _tool_call_reference,
    "code": _code_reference,
    "reasoning_gym": _reasoning_gym_reference,
}


def _messages(prompt: Any, system: str | None, fmt: PromptFormat) -> tuple[Message, ...]:
  if isinstance(prompt, str):
    return fmt.messages(prompt, system=system)
  if isinstance(prompt, (list, tuple)) and prompt:
    messages = tuple(Message(str(m["role"]), str(m["content"])) for m in prompt)
    if system and messages[0].role != "system":
      messages = (Message("system", system),) + messages
    return messages
  raise ValueError("'prompt' must be a non-empty string or list of messages")


def example_from_row(row: Mapping[str, Any], *, index: int, source: str = "jsonl",
                     prompt_format: PromptFormat | None = None,
                     verifier: str | None = None) -> Example:
  """One Example from one record of the schema above; errors name the row and field."""
  where = f"{source} row {index}"
  try:
    if "prompt" not in row:
      raise ValueError("missing field 'prompt'")
    name = row.get("verifier") or verifier
    if not name:
      raise ValueError("missing field 'verifier'")
    if "reference" not in row:
      raise ValueError("missing field 'reference'")
    decode = REFERENCE_DECODERS.get(name, lambda value: value)
    try:
      reference = decode(row["reference"])
    except (TypeError, KeyError, ValueError) as e:
      raise ValueError(f"bad 'reference' for verifier {name!r}: {e}") from e
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, Mapping):
      raise ValueError("'metadata' must be an object")
    return Example(prompt=_messages(row["prompt"], row.get("system"),
                                    prompt_format or PromptFormat()),
                   reference=reference, verifier=str(name), metadata=dict(metadata),
                   example_id=str(row.get("id") or f"{source}/{index}"))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def read_jsonl_rows(path: str | pathlib.Path) -> Iterator[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: invalid JSON: {e}") from e


def read_parquet_rows(path: str | pathlib.Path) -> Iterator[dict[str, Any]]:
  import pyarrow.parquet as pq

  yield from pq.read_table(path).to_pylist()


def _decode_json_fields(row: Mapping[str, Any]) -> dict[str, Any]:
  row = dict(row)
  for field in ("reference", "metadata"):
    encoded = row.pop(f"{field}_json", None)
    if encoded is not None:
      try:
        row[field] = json.loads(encoded)
      except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{field}_json' is not valid JSON: {e}") from e
  return row


def _examples(rows: Iterable[Mapping[str, Any]], source: str,
              **options: Any) -> Iterator[Example]:
  for index, row in enumerate(rows):
    row = _decode_json_fields(_drop_nulls(row))
    yield example_from_row(row, index=index, source=source, **options)


def _drop_nulls(row: Mapping[str, Any]) -> dict[str, Any]:
  # Parquet has no "absent": optional columns come back as None.
  return {k: v for k, v in row.items() if v is not None}


@register_task("jsonl")
def jsonl_examples(path: str | pathlib.Path, *, prompt_format: PromptFormat | None = None,
                   verifier: str | None = None) -> Iterator[Example]:
  """Examples from a JSONL file (or a parquet file, by its .parquet suffix)."""
  path = pathlib.Path(path)
  if path.suffix == ".parquet":
    yield from parquet_examples(path, prompt_format=prompt_format, verifier=verifier)
    return
  yield from _examples(read_jsonl_rows(path), path.stem, prompt_format=prompt_format,
                       verifier=verifier)


@register_task("parquet")
def parquet_examples(path: str | pathlib.Path, *, prompt_format: PromptFormat | None = None,
                     verifier: str | None = None) -> Iterator[Example]:
  """Examples from a parquet file with the same columns as the JSONL schema."""
  path = pathlib.Path(path)
  yield from _examples(read_parquet_rows(path), path.stem, prompt_format=prompt_format,
                       verifier=verifier)
