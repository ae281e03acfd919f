"""Host verifiers: math, multiple choice, tool calls, and parallel batch verification."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from mopd_jax.types import Example, Message, Verdict
from mopd_jax.verifiers import base
from mopd_jax.verifiers.base import get_verifier, register_verifier, verify_batch
from mopd_jax.verifiers.math import MathVerifier, equivalent, extract_answer
from mopd_jax.verifiers.multiple_choice import ChoiceReference, extract_choices
from mopd_jax.verifiers.tool_call import (
    ToolCall,
    ToolCallReference,
    ToolCallVerifier,
    canonical_calls,
    parse_tool_calls,
    render_calls,
)

TOWER = "5^{5^{5^{5^5}}}"


def _example(reference, verifier: str) -> Example:
  return Example(prompt=(Message("user", "q"),), reference=reference, verifier=verifier)


# ----------------------------------------------------------------- test-only verifiers
# Module level so worker processes can import them (by this module's name).


@dataclasses.dataclass(frozen=True)
class _Behaves:
  """reference "ok" -> success; "hang" sleeps; "raise" raises; "die" kills the worker."""

  name: str = "test_behaves"

  def __call__(self, example: Example, completion: str) -> Verdict:
    if completion == "hang":
      time.sleep(3600)
    if completion == "raise":
      raise RuntimeError("boom")
    if completion == "die":
      os._exit(7)
    if completion == "not a verdict":
      return "yes"  # type: ignore[return-value]
    ok = completion == example.reference
    return Verdict(reward=float(ok), success=ok, feedback="" if ok else "mismatch")


register_verifier(_Behaves())


@dataclasses.dataclass(frozen=True)
class _Stubborn:
  """The code verifier in a worker that ignores SIGTERM (as one stuck in C code would)."""

  name: str = "test_stubborn"

  def __call__(self, example: Example, completion: str) -> Verdict:
    import signal

    from mopd_jax.verifiers.code import CodeVerifier
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return CodeVerifier()(example, completion)


register_verifier(_Stubborn())


# ------------------------------------------------------------------------ registry


def test_registry_lazy_builtins_and_unknown():
  for name in ("math", "multiple_choice", "tool_call"):
    assert get_verifier(name).name == name
  with pytest.raises(KeyError, match="unknown verifier 'nope'.*known verifiers"):
    get_verifier("nope")


def test_register_conflict_needs_overwrite():
  @dataclasses.dataclass(frozen=True)
  class Other:
    name: str = "math"

    def __call__(self, example, completion):
      return Verdict(1.0, True)

  with pytest.raises(ValueError, match="already registered"):
    register_verifier(Other())


# ---------------------------------------------------------------------------- math

# (reference, completion, equivalent?)
MATH_CASES = [
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("0.5", "\\boxed{\\frac12}", True),
    ("1/2", "The answer is $\\frac{2}{4}$.", True),
    ("\\frac{3}{4}", "\\boxed{0.75}", True),
    ("\\frac{1}{3}", "\\boxed{0.333333}", True),
    ("\\frac{1}{3}", "\\boxed{0.33}", False),
    ("\\frac{2}{3}", "\\boxed{\\frac{3}{2}}", False),
    ("-4", "so the result is \\boxed{-4}", True),
    ("-4", "\\boxed{4}", False),
    ("30", "Answer: 30", True),
    ("30", "**Answer:** 30", True),
    ("1000", "\\boxed{1,000}", True),
    ("1234", "We get 1,234 apples in total", True),
    ("42", "First 7, then 6, finally 42", True),
    ("42", "First 42, then 6", False),
    ("\\sqrt{2}/2", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("\\pi", "\\boxed{3.14159265}", True),
    ("\\pi", "\\boxed{3.14}", False),
    ("10^{3}", "\\boxed{1000}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("x^2+1", "\\boxed{(x+1)^2}", False),
    ("x=5", "\\boxed{5}", True),
    ("5", "\\boxed{5\\text{ cm}}", True),
    ("5\\text{ cm}", "The answer is 5.", True),
    ("50\\%", "\\boxed{50\\%}", True),
    ("50\\%", "\\boxed{0.5}", True),
    ("\\{1,2,3\\}", "\\boxed{\\{3,1,2\\}}", True),
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", False),
    ("(1,2)", "\\boxed{(2,1)}", False),
    ("[1,2)", "\\boxed{[1,2)}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\boxed{\\frac{\\sqrt{3}}{2}}", True),
    ("7", "\\boxed{\\boxed{7}}", True),
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2006!}}", False),  # math-verify alone says True
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2004!}}", True),
    ("0", "\\boxed{0.0000001}", False),
    ("12", "no number here at all", False),
]


@pytest.mark.parametrize("reference,completion,expected", MATH_CASES)
def test_math_equivalence(reference, completion, expected):
  verdict = MathVerifier()(_example(reference, "math"), completion)
  assert verdict.success is expected, (verdict, reference, completion)
  assert verdict.reward == float(expected)


def test_math_has_enough_cases():
  assert len(MATH_CASES) >= 30


@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}} and \\boxed{x^{2}}", "x^{2}"),
    ("\\fbox{7}", "7"),
    ("The final answer is 3.5.", "3.5"),
    ("The answer is $x+1$. Done", "x+1"),
    ("Final Answer: \\(42\\)", "42"),
    ("total 1,234,567 items", "1234567"),
    ("ratio 3/4", "3/4"),
    ("nothing", None),
    ("\\boxed{unbalanced", None),
])
def test_extract_answer(text, answer):
  assert extract_answer(text) == answer


def test_math_feedback_hides_reference_by_default():
  verdict = MathVerifier()(_example("17", "math"), "\\boxed{16}")
  assert not verdict.success and "16" in verdict.feedback and "17" not in verdict.feedback
  revealing = MathVerifier(reveal_reference=True)(_example("17", "math"), "\\boxed{16}")
  assert "17" in revealing.feedback


def test_math_tower_times_out_in_main_thread():
  assert threading.current_thread() is threading.main_thread()
  start = time.monotonic()
  ok, note = equivalent("3", TOWER, timeout_s=2.0)
  assert not ok and note.startswith("timeout")
  assert time.monotonic() - start < 2.0 + 3.0


def test_math_tower_fails_within_deadline_from_other_thread():
  results = {}

  def run():
    verifier = MathVerifier(timeout_s=2.0)
    start = time.monotonic()
    # Same value, different spelling: only sympy could decide, and it would not finish.
    results["verdict"] = verifier(_example(TOWER, "math"), "\\boxed{5^{5^{5^{5^{5}}}}}")
    results["elapsed"] = time.monotonic() - start
    results["easy"] = verifier(_example("\\frac{1}{2}", "math"), "\\boxed{0.5}")

  thread = threading.Thread(target=run)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive()
  assert not results["verdict"].success and "timeout" in results["verdict"].feedback
  assert results["elapsed"] < 2.0 + 3.0
  assert results["easy"].success  # the subprocess path still judges normal answers


def test_math_tower_in_verify_batch_fails_within_deadline():
  examples = [_example(TOWER, "math"), _example("2", "math")]
  start = time.monotonic()
  verdicts = verify_batch(examples, ["\\boxed{5^{5^{5^{5^{5}}}}}", "\\boxed{2}"],
                          num_workers=2, deadline_s=20.0)
  assert not verdicts[0].success and verdicts[1].success
  assert time.monotonic() - start < 20.0


BIG = "1" + "0" * 5000  # 10**5000: past Python's 4300-digit int<->str limit


@pytest.mark.parametrize("reference,completion,ok", [
    (BIG, "\\boxed{10^{5000}}", True),
    ("10^{5000}", f"\\boxed{{{BIG}}}", True),
    (BIG, f"The answer is {BIG[:-1]}1.", False),
    ("10^{5000}", f"\\boxed{{{BIG}1}}", False),
], ids=["power_vs_literal", "literal_vs_power", "wrong_literal", "wrong_vs_power"])
def test_math_huge_integer_answers(reference, completion, ok):
  """A literal past 4300 digits used to stay an unparsed string (so a correct 10**5000
  spelled differently failed); a wrong one must fail as a plain wrong answer."""
  verdict = MathVerifier()(_example(reference, "math"), completion)
  assert verdict.success is ok, verdict
  if not ok:
    assert verdict.feedback.startswith("final answer") and "error" not in verdict.feedback


def test_math_feedback_of_a_huge_answer_is_clipped():
  answer = "x" * 1_000_000
  verdict = MathVerifier(timeout_s=2.0)(_example("3", "math"), f"\\boxed{{{answer}}}")
  assert not verdict.success and len(verdict.feedback) < 1200, len(verdict.feedback)
  assert verdict.feedback.startswith("final answer xxx") and "more chars" in verdict.feedback
  shown = MathVerifier(reveal_reference=True)(_example("17", "math"), "\\boxed{" + "9" * 5000 + "}")
  assert len(shown.feedback) < 1200 and shown.feedback.endswith("expected 17")


@pytest.mark.parametrize("inner", ["(" * 3000 + "1" + ")" * 3000, "{" * 3000 + "1" + "}" * 3000,
                                   "\\frac{1}{" * 1500 + "2" + "}" * 1500, "-" * 5000 + "1"],
                         ids=["parens", "braces", "fracs", "minus_signs"])
def test_math_deeply_nested_answers_are_verdicts(inner):
  verdict = MathVerifier(timeout_s=1.0)(_example("1", "math"), f"\\boxed{{{inner}}}")
  assert not verdict.success and verdict.feedback.startswith("final answer")
  assert len(verdict.feedback) < 1200


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("text,chosen", [
    ("\\boxed{C}", ["C"]),
    ("Reasoning...\nThe answer is (B).", ["B"]),
    ("**Answer:** D", ["D"]),
    ("Answer: c", ["C"]),
    ("C", ["C"]),
    ("(A)", ["A"]),
    ("The answer is C because A is wrong.", ["C"]),
    ("Final answer: \\boxed{\\text{(B)}}", ["B"]),
    ("So the correct option is (D).", ["D"]),
    ("Answer: A or C", ["A", "C"]),
    ("\\boxed{A, C}", ["A", "C"]),
    ("I am not sure.", []),
])
def test_extract_choices(text, chosen):
  assert extract_choices(text, "ABCD") == chosen


def test_multiple_choice_verdicts():
  verifier = get_verifier("multiple_choice")
  ref = ChoiceReference(answer="B", letters="ABCD")
  assert verifier(_example(ref, "multiple_choice"), "The answer is B.").success
  assert verifier(_example("B", "multiple_choice"), "\\boxed{B}").success  # bare letter
  wrong = verifier(_example(ref, "multiple_choice"), "\\boxed{C}")
  assert not wrong.success and "C" in wrong.feedback and "B" not in wrong.feedback
  hedge = verifier(_example(ref, "multiple_choice"), "Answer: B or C")
  assert not hedge.success and hedge.reward == 0.0 and "more than one" in hedge.feedback
  assert not verifier(_example(ref, "multiple_choice"), "no idea").success
  with pytest.raises(ValueError):
    ChoiceReference(answer="E", letters="ABCD")


# --------------------------------------------------------------------- tool calls


def _bfcl(category: str) -> list[Example]:
  from mopd_jax.tasks import load_task

  return list(load_task("bfcl", category=category))


@pytest.mark.parametrize("category,count", [("simple", 400), ("multiple", 200),
                                            ("parallel", 200)])
@pytest.mark.parametrize("style", ["json", "python"])
def test_bfcl_ground_truth_passes(category, count, style):
  verifier = get_verifier("tool_call")
  examples = _bfcl(category)
  assert len(examples) == count
  failures = []
  for example in examples:
    completion = render_calls(canonical_calls(example.reference), style)
    verdict = verifier(example, completion)
    if not verdict.success:
      failures.append((example.example_id, verdict.feedback))
  assert not failures, failures[:5]


def _wrong_type(value):
  if isinstance(value, bool):
    return "true"
  if isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, str):
    return 12345
  return "not a container"


def _mutations(example: Example) -> dict[str, tuple[Example, list[ToolCall]]]:
  calls = canonical_calls(example.reference)
  first, rest = calls[0], calls[1:]
  schema = {f["name"]: f["parameters"] for f in example.reference.functions}[first.name]
  out = {
      "wrong_function": [ToolCall("not_a_function", first.arguments)] + rest,
      "extra_argument": [ToolCall(first.name, {**first.arguments, "unexpected_xyz": 1})] + rest,
  }
  if first.arguments:
    key = next(iter(first.arguments))
    out["wrong_type"] = [ToolCall(first.name, {**first.arguments,
                                               key: _wrong_type(first.arguments[key])})] + rest
  required = [p for p in schema.get("required", []) if p in first.arguments]
  if required:
    out["missing_required"] = [ToolCall(first.name, {
        k: v for k, v in first.arguments.items() if k != required[0]})] + rest
  mutated = {k: (example, v) for k, v in out.items()}
  if len(calls) > 1 and calls[0] != calls[-1]:
    ordered = dataclasses.replace(example, reference=dataclasses.replace(
        example.reference, ordered=True))
    mutated["wrong_order"] = (ordered, calls[::-1])
  return mutated


@pytest.mark.parametrize("category", ["simple", "multiple", "parallel"])
def test_bfcl_mutations_fail(category):
  verifier = get_verifier("tool_call")
  counts: dict[str, int] = {}
  for example in _bfcl(category):
    for kind, (ex, calls) in _mutations(example).items():
      counts[kind] = counts.get(kind, 0) + 1
      verdict = verifier(ex, render_calls(calls, "python"))
      assert not verdict.success, (kind, example.example_id, render_calls(calls, "python"))
      assert verdict.feedback
  assert counts["wrong_function"] == counts["extra_argument"] == len(_bfcl(category))
  assert counts.get("missing_required", 0) > 0 and counts.get("wrong_type", 0) > 0
  if category == "parallel":
    assert counts["wrong_order"] > 150


def test_parallel_calls_any_order_unless_ordered():
  example = _bfcl("parallel")[0]
  calls = canonical_calls(example.reference)
  verifier = get_verifier("tool_call")
  assert verifier(example, render_calls(calls[::-1])).success
  ordered = dataclasses.replace(example, reference=dataclasses.replace(
      example.reference, ordered=True))
  assert verifier(ordered, render_calls(calls)).success
  assert not verifier(ordered, render_calls(calls[::-1])).success
  assert not verifier(example, render_calls(calls[:1])).success  # a call missing


def _reference(ground_truth, functions=(), ordered=False) -> ToolCallReference:
  return ToolCallReference(ground_truth=tuple(ground_truth), functions=tuple(functions),
                           ordered=ordered)


AREA = {"name": "area", "parameters": {"type": "dict", "properties": {
    "base": {"type": "integer"}, "height": {"type": "float"},
    "unit": {"type": "string"}, "dims": {"type": "array", "items": {"type": "integer"}}},
    "required": ["base", "height"]}}
AREA_GT = [{"area": {"base": [10], "height": [5.0], "unit": ["cm", ""],
                     "dims": [[1, 2, 3], ""]}}]


@pytest.mark.parametrize("completion,ok,feedback", [
    ("area(base=10, height=5)", True, ""),  # int accepted for float
    ("area(base=10, height=5.0, unit='CM')", True, ""),  # strings case-insensitive
    ("area(base=10, height=5, unit='c.m')", False, "'unit'"),  # no punctuation stripping
    ("area(base=10.0, height=5)", False, "expected type integer"),
    ("area(base=True, height=5)", False, "expected type integer"),
    ("area(base=10)", False, "missing required argument 'height'"),
    ("area(base=10, height=5, color='red')", False, "unexpected argument 'color'"),
    ("area(base=10, height=5, dims=[3, 2, 1])", False, "'dims'"),  # list order matters
    ("area(base=10, height=5, dims=[1, 2, 3])", True, ""),
    ("volume(base=10, height=5)", False, "no call to area"),
    ('{"name": "area", "arguments": {"base": 10, "height": 5}}', True, ""),
    ('<tool_call>\n{"name": "area", "arguments": {"base": 10, "height": 5}}\n</tool_call>',
     True, ""),
    ("```json\n[{\"name\": \"area\", \"arguments\": {\"base\": 10, \"height\": 5}}]\n```",
     True, ""),
    ("Let me call area(base=10, height=5) for you.", True, ""),
    ("area(base=-10, height=5)", False, "incorrect value"),
    ("area(10, 5)", True, ""),  # positional arguments mapped by the schema
])
def test_tool_call_cases(completion, ok, feedback):
  example = _example(_reference(AREA_GT, [AREA]), "tool_call")
  verdict = get_verifier("tool_call")(example, completion)
  assert verdict.success is ok, verdict
  assert feedback in verdict.feedback


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {path}')",
    "(lambda: __import__('os').system('touch {path}'))()",
    "lambda: __import__('os').system('touch {path}')",
    "[__import__('os').system('touch {path}')]",
    "{{'k': __import__('os').system('touch {path}')}}",
    "open('{path}', 'w').write('x')",
    "1+1",
    "-(-5)",
    "base",
    "f'{{__import__(\"os\").system(\"touch {path}\")}}'",
])
@pytest.mark.parametrize("wrapper", ["{call}", "<tool_call>{call}</tool_call>",
                                     "```python\n{call}\n```", "I will run {call} now."])
def test_tool_call_payloads_never_run(tmp_path, payload, wrapper):
  path = tmp_path / "pwned_x"
  call = "area(base=" + payload.format(path=path) + ", height=5)"
  example = _example(_reference(AREA_GT, [AREA]), "tool_call")
  verdict = get_verifier("tool_call")(example, wrapper.format(call=call))
  assert not verdict.success and verdict.reward == 0.0
  assert not path.exists()
  with pytest.raises(Exception):
    parse_tool_calls(call, [AREA])
  assert not path.exists()


def test_tool_call_payload_through_workers(tmp_path):
  path = tmp_path / "pwned_x"
  call = f"area(base=__import__('os').system('touch {path}'), height=5)"
  example = _example(_reference(AREA_GT, [AREA]), "tool_call")
  (verdict,) = verify_batch([example], [call], num_workers=1)
  assert not verdict.success and "not a literal" in verdict.feedback
  assert not path.exists()


def test_parse_tool_call_formats():
  openai = ('{"type": "function", "function": {"name": "a.b", '
            '"arguments": "{\\"x\\": [1, 2]}"}}')
  assert parse_tool_calls(openai) == [ToolCall("a.b", {"x": [1, 2]})]
  assert parse_tool_calls("[f(x=1), pkg.g(y='s')]") == [
      ToolCall("f", {"x": 1}), ToolCall("pkg.g", {"y": "s"})]
  assert parse_tool_calls('{"f": {"x": 1}}') == [ToolCall("f", {"x": 1})]
  assert parse_tool_calls("<think>f(x=2)</think>f(x=1)") == [ToolCall("f", {"x": 1})]
  assert parse_tool_calls("no calls") == []


DEEP = 1500  # past the interpreter's recursion limit (1000)


@pytest.mark.parametrize("completion,feedback", [
    ("a." * DEEP + "b(x=1)", "no call to area"),
    ("[" * 950 + '{"name": "area", "arguments": {"base": 10, "height": 5}}' + "]" * 950,
     "nested too deeply"),
    ('{"name": "area", "arguments": {"base": 10, "height": 5, "dims": '
     + "[" * 990 + "]" * 990 + "}}", "nested too deeply"),
    ('{"name": "area", "arguments": {"base": 10, "height": 5, "unit": '
     + '{"a": ' * 900 + "1" + "}" * 900 + "}}", "nested too deeply"),
    ('{"type": "function", "function": {"name": "area", "arguments": '
     + json.dumps('{"base": ' + "[" * 990 + "]" * 990 + "}") + "}}", "nested too deeply"),
    ("area(base=10, height=5, unit='" + "u" * 150_000 + "')", "incorrect value"),
], ids=["dotted_name", "nested_call_list", "nested_list_arg", "nested_dict_arg",
        "nested_json_string_arg", "huge_string_arg"])
def test_tool_call_deep_or_huge_structures_are_verdicts(completion, feedback):
  """Untrusted nesting deeper than the recursion limit used to raise RecursionError out of
  the verifier; a huge argument used to come back whole in the feedback."""
  example = _example(_reference(AREA_GT, [AREA]), "tool_call")
  verdict = ToolCallVerifier()(example, completion)
  assert not verdict.success and verdict.reward == 0.0
  assert feedback in verdict.feedback, verdict.feedback[:300]
  assert len(verdict.feedback) < 1200


def test_tool_call_fences_are_linear():
  """A ``` without a closing fence used to make the fence regex quadratic (95 s on 100k chars)."""
  example = _example(_reference(AREA_GT, [AREA]), "tool_call")
  for text in ("```" + "a" * 200_000, "```json" + " " * 200_000, "```a\n" * 40_000 + "x"):
    start = time.monotonic()
    verdict = ToolCallVerifier()(example, text)
    assert not verdict.success
    assert time.monotonic() - start < 1.0, text[:20]
  fenced = "```python\narea(base=10, height=5)\n```\n```json\n{}\n```"
  assert ToolCallVerifier()(example, fenced).success


# ------------------------------------------------------------------- verify_batch


def test_verify_batch_order_and_mixed_verifiers():
  examples = [
      _example("\\frac{1}{2}", "math"),
      _example(ChoiceReference("B"), "multiple_choice"),
      _example(_reference(AREA_GT, [AREA]), "tool_call"),
      _example("3", "math"),
      _example("ok", "test_behaves"),
  ]
  completions = ["\\boxed{0.5}", "\\boxed{C}", "area(base=10, height=5)", "\\boxed{4}", "ok"]
  verdicts = verify_batch(examples, completions, num_workers=2)
  assert [v.success for v in verdicts] == [True, False, True, False, True]
  many = verify_batch(examples * 8, completions * 8, num_workers=2)
  assert many == verdicts * 8


def test_verify_batch_never_raises():
  examples = [_example("ok", "test_behaves")] * 5 + [
      _example("ok", "no_such_verifier"),
      _example(lambda: 0, "test_behaves"),  # unpicklable reference
      _example("ok", "test_behaves"),
  ]
  completions = ["ok", "raise", "die", "not a verdict", 123, "ok", "ok", "ok"]
  verdicts = verify_batch(examples, completions, num_workers=2, deadline_s=20.0)
  assert len(verdicts) == len(examples)
  assert verdicts[0].success and verdicts[-1].success
  for verdict, needle in zip(verdicts[1:7], ["RuntimeError: boom", "died (exit code 7)",
                                             "not a Verdict", "must be a str",
                                             "unknown verifier", "cannot send"]):
    assert not verdict.success and verdict.reward == 0.0
    assert needle in verdict.feedback, verdict
  with pytest.raises(ValueError):
    verify_batch(examples, completions[:-1])


def test_verify_batch_timeout_kills_and_replaces_worker():
  pool = base.VerifierPool(2)
  try:
    pool.verify([_example("ok", "test_behaves")] * 2, ["ok"] * 2)  # workers up and warm
    examples = [_example("ok", "test_behaves")] * 8
    completions = ["hang", "ok", "hang", "ok", "ok", "ok", "hang", "ok"]
    start = time.monotonic()
    verdicts = pool.verify(examples, completions, deadline_s=1.5)
    elapsed = time.monotonic() - start
    for verdict, completion in zip(verdicts, completions):
      if completion == "hang":
        assert not verdict.success and "timeout" in verdict.feedback
        assert verdict.details["error"] == "Timeout"
      else:
        assert verdict.success, verdict
    assert elapsed < 3 * 1.5 + 15.0  # hung items do not block the others
    assert pool.verify([examples[0]], ["ok"])[0].success  # the pool still works
  finally:
    pool.close()


_SLEEPER = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
            " start_new_session=True)\n"
            "time.sleep(120)\n")


def _environ(pid: int) -> dict[str, str]:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      raw = f.read().decode("utf-8", "replace")
  except OSError:
    return {}
  return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


@pytest.mark.parametrize("verifier", ["code", "test_stubborn"])
def test_pool_deadline_ends_the_workers_sandbox_run(verifier):
  """A worker killed at its deadline takes its sandbox run along: the launcher, the program,
  what that spawned, and the run's temp dir (they used to run on to the sandbox's own, later
  deadline, and the temp dir stayed). "test_stubborn" ignores the SIGTERM that lets a worker
  clean up: the pool's sweep after SIGKILL must do it."""
  from mopd_jax.verifiers import sandbox
  from mopd_jax.verifiers.code import CodeTests

  pool = base.VerifierPool(1)
  pool.abort_grace_s = 1.0
  seen: dict[int, sandbox.ProcInfo] = {}
  workdirs: set[str] = set()
  stop = threading.Event()
  try:
    pool.verify([_example("ok", "test_behaves")], ["ok"])  # the worker is up
    worker = pool._workers[0].process.pid

    def watch():  # everything below the worker while the run lasts
      while not stop.is_set():
        for p in sandbox.find_processes(ancestor=worker):
          seen.setdefault(p.pid, p)
          if p.ppid == worker and sandbox.MARKER_ENV in _environ(p.pid):
            workdirs.add(_environ(p.pid)["HOME"])
        time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    tests = CodeTests(style="stdio", stdio=(("", "never"),), timeout_s=60)
    start = time.monotonic()
    (verdict,) = pool.verify([_example(tests, verifier)], [_SLEEPER], deadline_s=4.0)
    elapsed = time.monotonic() - start
  finally:
    stop.set()
    pool.close()
  assert not verdict.success and verdict.details["error"] == "Timeout", verdict
  assert elapsed < 4.0 + 10.0
  assert workdirs and len(seen) >= 3, seen  # launcher, program, its child
  uids = {u for p in seen.values() for u in p.uids if u >= sandbox.UID_BASE}
  left = [sandbox._proc_info(p.pid) for p in seen.values()]
  left = [p for p in left if p is not None]
  left += [p for u in uids for p in sandbox.find_processes(uid=u)]
  if verifier == "test_stubborn":  # the launcher's zombie went to init with its parent
    left = [p for p in left if not (p.state == "Z" and p.ppid == 1)]
  assert not left, left
  assert not [d for d in workdirs if os.path.exists(d)]


def _deterministic_batch() -> tuple[list[Example], list[str]]:
  from mopd_jax.tasks import load_task

  arithmetic = list(load_task("basic_arithmetic", size=12, seed=3))
  countdown = list(load_task("countdown", size=4, seed=3))
  bfcl = _bfcl("parallel")[:6]
  examples = arithmetic + countdown + bfcl
  completions = ([f"\\boxed{{{e.reference}}}" for e in arithmetic[:6]]
                 + ["The answer is 1." for _ in arithmetic[6:]]
                 + [f"<answer>{e.reference.entry['answer']}</answer>" for e in countdown[:2]]
                 + ["<answer>1 + 2</answer>", "none"]
                 + [render_calls(canonical_calls(e.reference)) for e in bfcl[:3]]
                 + [render_calls(canonical_calls(e.reference)[:1]) for e in bfcl[3:]])
  return examples, completions


def test_verify_batch_deterministic_with_other_core_busy():
  examples, completions = _deterministic_batch()
  busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  try:
    first = verify_batch(examples, completions, num_workers=2, deadline_s=60.0)
    second = verify_batch(examples, completions, num_workers=2, deadline_s=60.0)
  finally:
    busy.kill()
    busy.wait()
  assert first == second
  assert sum(v.success for v in first) >= 6 + 2 + 3
  assert [v.success for v in first] == [
      v.success for v in (base.verify_one(e, c) for e, c in zip(examples, completions))]


def test_workers_of_a_python_dash_m_program_print_no_runpy_warning(tmp_path):
  # `python -m mopd_jax.main` preloads its main module by name in the forkserver; without the
  # filter in verifiers/base.py every worker printed a runpy RuntimeWarning into the job's output.
  (tmp_path / "demo_pkg").mkdir()
  (tmp_path / "demo_pkg" / "__init__.py").write_text("")
  (tmp_path / "demo_pkg" / "job.py").write_text(
      "from mopd_jax.types import Example, Message\n"
      "from mopd_jax.verifiers.base import verify_batch\n"
      "if __name__ == '__main__':\n"
      "  ex = Example(prompt=(Message(role='user', content='1+1?'),), reference='2', verifier='math')\n"
      "  print([v.success for v in verify_batch([ex, ex], ['\\\\boxed{2}', '\\\\boxed{3}'], num_workers=2)])\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), repo, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-m", "demo_pkg.job"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[True, False]"
  assert "found in sys.modules" not in out.stderr, out.stderr
