"""Tool-call verifier: parse function calls from a completion, match them to ground truth.

Reference: a `ToolCallReference` holding BFCL-style ground truth, one entry per expected
call, `{function_name: {argument: [acceptable values, ...]}}`, the functions' JSON-schema
descriptions (BFCL's "function" field), and whether call order matters.

Parsing (never `eval`, never executes anything). Calls are looked for in `<tool_call>`
blocks, else in ``` fenced blocks, else in the whole text (`<think>` blocks ignored):
  - JSON: {"name": f, "arguments": {...}} (also "parameters", OpenAI's
    {"type": "function", "function": {...}} with arguments as a JSON string,
    {"tool_calls": [...]}, BFCL's {f: {...}}), or a list of them;
  - Python call syntax: `f(a=1, b="x")`, `pkg.f(...)`, several per line or a list
    `[f(a=1), g(b=2)]`. Argument values are read by walking the AST and accepting only
    literals (str, numbers, booleans, None, lists, tuples, dicts, and a sign on a number);
    anything else (`__import__('os').system(...)`, `lambda: 0`, `1+1`, names) makes the call
    invalid. Positional arguments are mapped to the schema's parameters in order.

Matching follows BFCL's AST checker for Python (possible-answer semantics):
  - each argument's list holds its acceptable values; "" in it means it may be omitted;
  - a missing required argument, an argument not in the schema or not in the ground truth,
    or a value not in the list fails;
  - types come from the schema: bool is never an int; an int is accepted where a float is
    expected (also inside arrays); a tuple is accepted for "tuple"; when the ground truth
    holds a value of another type than the schema's (BFCL's "variable" case) that type
    is accepted too;
  - strings compare case-insensitively after trimming surrounding whitespace; unlike BFCL,
    punctuation and inner spaces are NOT stripped ("April 1, 2024" != "April 12024").
    Exception: when the ground truth itself has values of one argument that differ only
    by case (genotypes "AA", "Aa", "aa"), that argument compares case-sensitively;
  - lists compare element-wise, in order; dicts key by key (BFCL's dict checker);
  - several expected calls (parallel) match in any order (a full bipartite matching, not
    BFCL's greedy pass) unless `ordered`; the number of calls must equal the expected.
  - a function named `a.b` may also be called as `a_b` (APIs that forbid dots).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Any, Iterator, Mapping, Sequence

from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import base


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str
  arguments: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolCallReference:
  """Ground truth: `ground_truth[i] = {function: {argument: [acceptable values]}}`."""

  ground_truth: tuple[Mapping[str, Mapping[str, Sequence[Any]]], ...]
  functions: tuple[Mapping[str, Any], ...] = ()  # JSON-schema function descriptions
  ordered: bool = False  # True: the i-th call must match the i-th ground-truth entry


class ToolCallParseError(ValueError):
  """The completion holds something call-shaped that is not a valid call."""


# --------------------------------------------------------------------- literal values

_MAX_TEXT = 200_000  # longer completions are cut
_MAX_CALL_CHARS = 20_000  # a call in prose longer than this is not looked for
_MAX_CANDIDATES = 256  # `name(` occurrences examined in prose (bounds the work)
# Nesting of a parsed value (JSON or literal): deeper is no tool call, and the matching below
# recurses once per level, so a value past the recursion limit would crash it.
_MAX_DEPTH = 100


def _check_depth(value: Any) -> Any:
  """`value`, or ToolCallParseError when its containers nest deeper than `_MAX_DEPTH`."""
  level = [value]
  for _ in range(_MAX_DEPTH + 1):
    level = [v for x in level if isinstance(x, (list, tuple, dict))
             for v in (x.values() if isinstance(x, dict) else x)]
    if not level:
      return value
  raise _too_deep()


def _too_deep() -> ToolCallParseError:
  return ToolCallParseError(f"value nested too deeply (more than {_MAX_DEPTH} levels)")


def literal_value(node: ast.AST) -> Any:
  """The value of a literal AST node; raises ToolCallParseError for anything else.

  Like `ast.literal_eval` but stricter (no sets, no complex arithmetic, no byte strings) and
  with an error naming what was found. Nothing is evaluated.
  """
  if isinstance(node, ast.Constant):
    if isinstance(node.value, (str, int, float, bool)) or node.value is None:
      return node.value
    raise ToolCallParseError(f"unsupported constant {type(node.value).__name__}")
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    operand = node.operand
    if (isinstance(operand, ast.Constant) and type(operand.value) in (int, float)):
      return -operand.value if isinstance(node.op, ast.USub) else operand.value
  if isinstance(node, ast.List):
    return [literal_value(e) for e in node.elts]
  if isinstance(node, ast.Tuple):
    return tuple(literal_value(e) for e in node.elts)
  if isinstance(node, ast.Dict):
    if any(k is None for k in node.keys):
      raise ToolCallParseError("dict unpacking (**) is not a literal")
    keys = [literal_value(k) for k in node.keys]
    if not all(isinstance(k, (str, int, float, bool)) for k in keys):
      raise ToolCallParseError("dict keys must be strings or numbers")
    return dict(zip(keys, (literal_value(v) for v in node.values)))
  raise ToolCallParseError(f"not a literal ({type(node).__name__})")


def _dotted_name(node: ast.AST) -> str | None:
  parts = []
  while isinstance(node, ast.Attribute):  # a loop: `a.a.a...` may be any length
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return ".".join([node.id, *reversed(parts)])


def _call_from_ast(node: ast.Call, functions: Mapping[str, Mapping[str, Any]]) -> ToolCall:
  name = _dotted_name(node.func)
  if name is None:
    raise ToolCallParseError("the called object is not a (dotted) name")
  arguments: dict[str, Any] = {}
  if node.args:
    params = list(_schema_for(name, functions).get("properties", {}))
    if any(isinstance(a, ast.Starred) for a in node.args):
      raise ToolCallParseError(f"{name}: *args is not supported")
    if len(node.args) > len(params):
      raise ToolCallParseError(f"{name}: {len(node.args)} positional arguments, but the "
                               f"schema names {len(params)} parameters")
    for param, arg in zip(params, node.args):
      arguments[param] = _argument(name, param, arg)
  for keyword in node.keywords:
    if keyword.arg is None:
      raise ToolCallParseError(f"{name}: **kwargs is not supported")
    if keyword.arg in arguments:
      raise ToolCallParseError(f"{name}: argument {keyword.arg!r} given twice")
    arguments[keyword.arg] = _argument(name, keyword.arg, keyword.value)
  return ToolCall(name, _check_depth(arguments))


def _argument(function: str, param: str, node: ast.AST) -> Any:
  try:
    return literal_value(node)
  except ToolCallParseError as e:
    raise ToolCallParseError(f"argument {param!r} of {function}: {e}") from None
  except RecursionError:
    raise ToolCallParseError(f"argument {param!r} of {function}: nested too deeply") from None


def _calls_from_python(source: str,
                       functions: Mapping[str, Mapping[str, Any]]) -> list[ToolCall] | None:
  """Calls when `source` is only call expressions (or lists of them); None if it is not."""
  try:
    tree = ast.parse(source.strip(), mode="exec")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  nodes: list[ast.Call] = []
  for statement in tree.body:
    if not isinstance(statement, ast.Expr):
      return None
    value = statement.value
    elements = value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
    if not elements or not all(isinstance(e, ast.Call) for e in elements):
      return None
    nodes.extend(elements)
  return [_call_from_ast(n, functions) for n in nodes] if nodes else None


# ----------------------------------------------------------------------- JSON calls

_WRAPPER_KEYS = {"name", "arguments", "parameters", "function", "type", "id", "tool_calls"}


def _calls_from_json(value: Any) -> list[ToolCall] | None:
  """Calls described by a decoded JSON value; None if it does not describe calls."""
  if isinstance(value, list):
    calls = [_calls_from_json(v) for v in value]
    if not value or any(c is None for c in calls):
      return None
    return [call for group in calls for call in group]  # type: ignore[union-attr]
  if not isinstance(value, dict):
    return None
  if "tool_calls" in value and isinstance(value["tool_calls"], list):
    return _calls_from_json(value["tool_calls"])
  if isinstance(value.get("function"), dict):
    return _calls_from_json(value["function"])
  if isinstance(value.get("name"), str):
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
      try:
        arguments = json.loads(arguments) if arguments.strip() else {}
      except RecursionError:
        raise _too_deep() from None
      except ValueError:
        raise ToolCallParseError(f"{value['name']}: arguments are not valid JSON") from None
      # Outside the try: ToolCallParseError is a ValueError, and "too deep" is not "invalid".
      arguments = _check_depth(arguments)
    if not isinstance(arguments, dict):
      raise ToolCallParseError(f"{value['name']}: arguments must be a JSON object")
    return [ToolCall(value["name"], arguments)]
  if len(value) == 1:  # BFCL style {"f": {"a": 1}}
    (name, arguments), = value.items()
    if name not in _WRAPPER_KEYS and isinstance(arguments, dict):
      return [ToolCall(name, arguments)]
  return None


def _loads(text: str) -> Any:
  try:
    return json.loads(text)
  except ValueError:
    return None
  except RecursionError:  # the decoder's own depth limit: too deep to be a call
    raise _too_deep() from None


def _scan_json(text: str) -> list[ToolCall]:
  """Call-shaped JSON objects/arrays embedded anywhere in `text`, in order."""
  decoder = json.JSONDecoder()
  calls: list[ToolCall] = []
  i = attempts = 0
  while i < len(text) and attempts < _MAX_CANDIDATES:
    # A call is an object, or a list whose first element is one.
    if text[i] == "{" or (text[i] == "[" and text[i + 1:i + 64].lstrip().startswith("{")):
      attempts += 1
      try:
        value, end = decoder.raw_decode(text, i)
      except ValueError:
        i += 1
        continue
      except RecursionError:
        raise _too_deep() from None
      found = _calls_from_json(_check_depth(value))
      if found:
        calls.extend(found)
        i = end
        continue
    i += 1
  return calls


# --------------------------------------------------------------- Python calls in prose

_CALL_START = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\(")


def _closing_paren(text: str, open_index: int) -> int | None:
  """Index of the ')' closing the '(' at `open_index`, skipping string literals."""
  depth, i, quote = 0, open_index, None
  end = min(len(text), open_index + _MAX_CALL_CHARS)
  while i < end:
    c = text[i]
    if quote:
      if c == "\\":
        i += 1
      elif text.startswith(quote, i):
        i += len(quote) - 1
        quote = None
    elif c in "'\"":
      quote = c * 3 if text.startswith(c * 3, i) else c
      i += len(quote) - 1
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return i if c == ")" else None
    i += 1
  return None


def _scan_python(text: str, known: set[str],
                 functions: Mapping[str, Mapping[str, Any]]) -> list[ToolCall]:
  """`name(...)` calls in prose whose name is a known function (all names if none known)."""
  calls: list[ToolCall] = []
  position = candidates = 0
  for match in _CALL_START.finditer(text):
    if match.start() < position:
      continue
    name = match.group(1)
    if known and not any(_name_matches(name, k) for k in known):
      continue
    candidates += 1
    if candidates > _MAX_CANDIDATES:
      break
    close = _closing_paren(text, match.end() - 1)
    if close is None:
      continue
    try:
      node = ast.parse(text[match.start():close + 1], mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
      continue
    if isinstance(node, ast.Call):
      calls.append(_call_from_ast(node, functions))
      position = close + 1
  return calls


# ------------------------------------------------------------------------ extraction

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FENCE_HEADER = re.compile(r"[\w+-]*[ \t]*\n?")


def _fence_bodies(text: str) -> list[str]:
  """Bodies of the closed ``` blocks, left to right. A str.find scan: the regex it replaces
  rescanned to the end from every header length it backtracked through (quadratic on an
  unclosed ``` followed by a long word). Each search starts past the last: linear."""
  bodies = []
  i = 0
  while (start := text.find("```", i)) >= 0:
    end = text.find("```", start + 3)
    if end < 0:
      break
    header = _FENCE_HEADER.match(text, start + 3, end)  # language, spaces, one newline
    bodies.append(text[header.end():end])
    i = end + 3
  return bodies


def _calls_in_segment(segment: str, known: set[str],
                      functions: Mapping[str, Mapping[str, Any]],
                      scan: bool) -> list[ToolCall]:
  value = _loads(segment.strip())
  if value is not None:
    _check_depth(value)
    calls = _calls_from_json(value)
    if calls is not None:
      return calls
  calls = _calls_from_python(segment, functions)
  if calls is not None:
    return calls
  if not scan:
    return []
  return _scan_json(segment) or _scan_python(segment, known, functions)


def parse_tool_calls(text: str, functions: Sequence[Mapping[str, Any]] = (),
                     known_names: Sequence[str] = ()) -> list[ToolCall]:
  """The tool calls in a completion, by the rules of the module docstring.

  Raises ToolCallParseError when a call is malformed (e.g. a non-literal argument).
  `known_names` restricts calls found in free prose to those functions.
  """
  text = _THINK.sub("", text[:_MAX_TEXT])
  by_name = {f["name"]: f for f in functions if "name" in f}
  known = set(known_names) | set(by_name)
  blocks = _TOOL_CALL_BLOCK.findall(text)
  if blocks:
    return [c for b in blocks for c in _calls_in_segment(b, known, by_name, scan=True)]
  fences = _fence_bodies(text)
  calls = [c for f in fences for c in _calls_in_segment(f, known, by_name, scan=False)]
  if calls:
    return calls
  return _calls_in_segment(text, known, by_name, scan=True)


# -------------------------------------------------------------------------- matching

_PY_TYPES: dict[str, type] = {
    "string": str, "integer": int, "float": float, "number": float, "boolean": bool,
    "array": list, "tuple": list, "dict": dict, "object": dict, "any": str,
}


def _name_matches(called: str, expected: str) -> bool:
  return called == expected or called == expected.replace(".", "_")


def _schema_for(name: str, functions: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
  for expected, description in functions.items():
    if _name_matches(name, expected):
      return description.get("parameters", {})
  return {}


def _first_type(possible: Sequence[Any]) -> type | None:
  for value in possible:
    if not (isinstance(value, str) and value == ""):
      return type(value)
  return None


def _norm(value: Any, fold: bool = True) -> Any:
  """Comparison form: strings trimmed (and case-folded), containers element-wise."""
  if isinstance(value, str):
    return value.strip().casefold() if fold else value.strip()
  if isinstance(value, (list, tuple)):
    return [_norm(v, fold) for v in value]
  if isinstance(value, dict):
    return {k: _norm(v, fold) for k, v in value.items()}
  return value


def _same(a: Any, b: Any) -> bool:
  """Equality that never equates a bool with a number (Python's True == 1)."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (list, dict)) or isinstance(b, (list, dict)):
    return False
  return type(a) in (int, float) and type(b) in (int, float) and a == b or (
      type(a) is type(b) and a == b)


def _type_error(value: Any, schema: Mapping[str, Any], possible: Sequence[Any]) -> str | None:
  """Why `value` has the wrong type for its parameter (None when it is fine)."""
  type_name = schema.get("type", "any")
  expected = _PY_TYPES.get(type_name)
  if expected is None:
    return None  # An unknown schema type: values alone decide.
  possible_type = _first_type(possible)
  if type(value) is expected or (expected is float and type(value) is int):
    item_type = _PY_TYPES.get(schema.get("items", {}).get("type", ""))
    if expected is list and item_type is not None:
      for item in value:
        if not (type(item) is item_type or (item_type is float and type(item) is int)):
          # BFCL's variable case one level down: the ground truth's own item type.
          lists = [p for p in possible if isinstance(p, list) and p]
          if not any(type(item) is _first_type(p) for p in lists):
            return f"expected a list of {schema['items']['type']}, got an item {item!r}"
    return None
  if possible_type is not None and possible_type is not expected and type(value) is possible_type:
    return None  # BFCL "variable": the ground truth itself holds this type.
  return f"expected type {type_name}, got {type(value).__name__} {value!r}"


def _dict_matches(value: Mapping[str, Any], possible: Sequence[Any], fold: bool = True) -> bool:
  """BFCL's dict checker: keys known, values acceptable, missing keys optional."""
  for answer in possible:
    if not isinstance(answer, dict):
      continue
    ok = all(k in answer and _value_in(v, answer[k], fold) for k, v in value.items())
    ok = ok and all(k in value or "" in vals for k, vals in answer.items()
                    if isinstance(vals, list))
    if ok:
      return True
  return False


def _value_in(value: Any, acceptable: Any, fold: bool = True) -> bool:
  options = acceptable if isinstance(acceptable, list) else [acceptable]
  if isinstance(value, dict):
    return _dict_matches(value, options, fold) or any(
        _same(_norm(value, fold), _norm(o, fold)) for o in options)
  return any(not (isinstance(o, str) and o == "") and _same(_norm(value, fold), _norm(o, fold))
             for o in options)


def _list_of_dicts_matches(value: list, possible: Sequence[Any], fold: bool = True) -> bool:
  for answer in possible:
    if isinstance(answer, list) and len(answer) == len(value) and all(
        isinstance(v, dict) and _dict_matches(v, [a], fold) for v, a in zip(value, answer)):
      return True
  return False


def check_call(call: ToolCall, expected_name: str, possible: Mapping[str, Sequence[Any]],
               parameters: Mapping[str, Any],
               case_sensitive: frozenset[str] = frozenset()) -> str | None:
  """Why `call` does not match one ground-truth call (None when it does).

  Strings of the arguments named in `case_sensitive` compare exactly (after trimming).
  """
  if not _name_matches(call.name, expected_name):
    return f"called {call.name}, expected {expected_name}"
  properties = parameters.get("properties") or {
      arg: {"type": _infer_type(vals)} for arg, vals in possible.items()}
  required = parameters.get("required")
  if required is None:
    required = [arg for arg, vals in possible.items() if "" not in vals]
  for param in required:
    if param not in call.arguments:
      return f"{expected_name}: missing required argument {param!r}"
  for param, value in call.arguments.items():
    if param not in properties or param not in possible:
      return f"{expected_name}: unexpected argument {param!r}"
    schema = properties[param]
    if schema.get("type") == "tuple" and isinstance(value, tuple):
      value = list(value)
    error = _type_error(value, schema, possible[param])
    if error:
      return f"{expected_name}: argument {param!r}: {error}"
    if not _argument_matches(value, schema, possible[param], param not in case_sensitive):
      return f"{expected_name}: argument {param!r} has an incorrect value {value!r}"
  for param, vals in possible.items():
    if param not in call.arguments and "" not in vals:
      return f"{expected_name}: missing argument {param!r}"
  return None


def _argument_matches(value: Any, schema: Mapping[str, Any], possible: Sequence[Any],
                      fold: bool) -> bool:
  item_type = schema.get("items", {}).get("type")
  if isinstance(value, dict):
    return _dict_matches(value, possible, fold) or _value_in(value, list(possible), fold)
  if isinstance(value, list) and item_type in ("dict", "object"):
    return _list_of_dicts_matches(value, possible, fold) or _value_in(value, list(possible), fold)
  return _value_in(value, list(possible), fold)


def _strings(value: Any) -> Iterator[str]:
  if isinstance(value, str):
    yield value.strip()
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _strings(v)
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)


def case_sensitive_arguments(reference: ToolCallReference) -> dict[str, frozenset[str]]:
  """Per function, the arguments whose ground truth tells strings apart by case alone
  (e.g. genotypes "AA" and "aa" in two parallel calls): those compare exactly."""
  seen: dict[tuple[str, str], set[str]] = {}
  for gt in reference.ground_truth:
    for function, arguments in gt.items():
      for arg, values in arguments.items():
        seen.setdefault((function, arg), set()).update(s for s in _strings(values) if s)
  out: dict[str, set[str]] = {}
  for (function, arg), strings in seen.items():
    if len({s.casefold() for s in strings}) < len(strings):
      out.setdefault(function, set()).add(arg)
  return {f: frozenset(args) for f, args in out.items()}


def _infer_type(possible: Sequence[Any]) -> str:
  t = _first_type(possible)
  for name, python_type in _PY_TYPES.items():
    if python_type is t:
      return name
  return "any"


def _max_matching(ok: list[list[bool]]) -> list[int | None]:
  """Maximum bipartite matching: for each expected i, the call index it takes (or None)."""
  n_calls = len(ok[0]) if ok else 0
  call_owner: list[int | None] = [None] * n_calls

  def augment(i: int, seen: set[int]) -> bool:
    for j in range(n_calls):
      if ok[i][j] and j not in seen:
        seen.add(j)
        if call_owner[j] is None or augment(call_owner[j], seen):
          call_owner[j] = i
          return True
    return False

  for i in range(len(ok)):
    augment(i, set())
  taken: list[int | None] = [None] * len(ok)
  for j, i in enumerate(call_owner):
    if i is not None:
      taken[i] = j
  return taken


def match_calls(calls: Sequence[ToolCall], reference: ToolCallReference) -> str | None:
  """Why `calls` do not satisfy `reference` (None when they do)."""
  functions = {f["name"]: f for f in reference.functions if "name" in f}
  expected = [next(iter(gt.items())) for gt in reference.ground_truth]
  exact = case_sensitive_arguments(reference)
  if len(calls) != len(expected):
    return f"expected {len(expected)} tool call(s), got {len(calls)}"

  def error(i: int, j: int) -> str | None:
    name, possible = expected[i]
    return check_call(calls[j], name, possible, _schema_for(name, functions),
                      exact.get(name, frozenset()))

  if reference.ordered:
    for i in range(len(expected)):
      why = error(i, i)
      if why:
        return f"call {i + 1}: {why}"
    return None
  errors = [[error(i, j) for j in range(len(calls))] for i in range(len(expected))]
  taken = _max_matching([[e is None for e in row] for row in errors])
  for i, j in enumerate(taken):
    if j is None:
      name = expected[i][0]
      same_name = [e for e in errors[i] if e and not e.startswith("called ")]
      if same_name:
        return same_name[0]
      return f"no call to {name} matches (called: {', '.join(c.name for c in calls)})"
  return None


def canonical_calls(reference: ToolCallReference) -> list[ToolCall]:
  """One correct answer: the first acceptable value of each argument (optional ones left out
  when they have no value)."""
  calls = []
  for gt in reference.ground_truth:
    (name, possible), = gt.items()
    arguments = {}
    for arg, values in possible.items():
      chosen = [v for v in values if not (isinstance(v, str) and v == "")]
      if chosen:
        arguments[arg] = chosen[0]
    calls.append(ToolCall(name, arguments))
  return calls


def render_calls(calls: Sequence[ToolCall], style: str = "json") -> str:
  """Calls as text a verifier parses: "json" (a list of {"name", "arguments"}) or "python"."""
  if style == "json":
    return json.dumps([{"name": c.name, "arguments": dict(c.arguments)} for c in calls])
  if style == "python":
    return "[" + ", ".join(
        f"{c.name}(" + ", ".join(f"{k}={v!r}" for k, v in c.arguments.items()) + ")"
        for c in calls) + "]"
  raise ValueError(f"unknown style {style!r}; use 'json' or 'python'")


# --------------------------------------------------------------------------- verifier


@dataclasses.dataclass(frozen=True)
class ToolCallVerifier:
  """Reward 1 when the completion's calls match the ground truth, else 0."""

  name: str = "tool_call"

  def __call__(self, example: Example, completion: str) -> Verdict:
    reference = example.reference
    if not isinstance(reference, ToolCallReference):
      return failure_verdict(f"tool_call reference must be a ToolCallReference, got "
                             f"{type(reference).__name__}")
    known = [next(iter(gt)) for gt in reference.ground_truth]
    known += [f["name"] for f in reference.functions if "name" in f]
    try:
      calls = parse_tool_calls(completion, reference.functions, known)
    except ToolCallParseError as e:
      return failure_verdict(base.clip(f"invalid tool call: {e}"))
    except RecursionError:  # a last resort: the parsers above bound nesting themselves
      return failure_verdict(f"invalid tool call: {_too_deep()}")
    if not calls:
      return failure_verdict("no tool call found", calls=())
    details = {"calls": tuple(base.clip(c.name, 200) for c in calls)}
    try:
      why = match_calls(calls, reference)
    except RecursionError:
      why = f"invalid tool call: {_too_deep()}"
    if why:
      return failure_verdict(base.clip(why), **details)  # may quote huge values
    return Verdict(reward=1.0, success=True, details=details)


base.register_verifier(ToolCallVerifier())
