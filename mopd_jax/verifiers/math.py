"""Math final-answer verifier: extract the final answer, compare with math-verify.

Reference: the gold answer string (LaTeX or plain), e.g. "\\frac{1}{2}", "30", "\\{1, 2\\}".

Extraction (first rule that matches wins, the last occurrence within a rule):
  1. `\\boxed{...}` / `\\fbox{...}` (nested braces handled),
  2. "the (final) answer is X",
  3. a line "Answer: X" (markdown bold allowed),
  4. the last number in the text (integers, decimals, a/b, thousands separators).

Equivalence is math-verify's `parse` + `verify` (numeric, symbolic, sets, intervals,
relations, units and percentages), under one overall deadline, plus a guard against its
absolute-rounding false positives: two numeric answers must also agree to a relative
tolerance (math-verify rounds to 6 decimals, which equates 1/2004! and 1/2006!).

Timeouts: in the main thread a SIGALRM interval timer interrupts sympy. From any other
thread (signals unusable) the check runs in a forkserver child process that is killed at
the deadline, so adversarial answers such as `5^{5^{5^{5^5}}}` fail in bounded time anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import signal
import sys
import threading
import time
from typing import Any

import math_verify
import sympy

from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import base

# ------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?i)\bthe\s+(?:final\s+|correct\s+)?answer\s+is\s*:?\s*")
# Linear-time patterns only (completions are untrusted): no lazy group before a trailing
# optional run, which backtracks quadratically on long lines.
_ANSWER_LINE = re.compile(r"(?im)^[ \t>#*_]*(?:final\s+)?answer[ \t*_]*[:：](?P<answer>.*)$")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?!\w)")
# A sentence ends at a period followed by whitespace or the end (not a decimal point).
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


def _brace_pairs(text: str) -> dict[int, int]:
  """Index of each '{' -> index of its matching '}', in one linear pass. Escaped braces
  (\\{, \\}) are literal characters, not groups."""
  pairs, stack = {}, []
  for i, c in enumerate(text):
    if c in "{}" and i > 0 and text[i - 1] == "\\":
      continue
    if c == "{":
      stack.append(i)
    elif c == "}" and stack:
      pairs[stack.pop()] = i
  return pairs


def last_boxed(text: str) -> str | None:
  """The contents of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`."""
  matches = list(_BOXED.finditer(text))
  if not matches:
    return None
  pairs = _brace_pairs(text)
  for match in reversed(matches):
    close = pairs.get(match.end() - 1)
    if close is not None:
      return text[match.end():close].strip()
  return None


def _clean(answer: str) -> str:
  """Strips math delimiters, markdown emphasis and trailing punctuation."""
  answer = answer.strip()
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"),
                      ("**", "**"), ("*", "*"), ("`", "`")):
    if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
      answer = answer[len(left):-len(right)].strip()
  return answer.rstrip(" .;,").strip()


def _answer_is(text: str) -> str | None:
  matches = list(_ANSWER_IS.finditer(text))
  if not matches:
    return None
  rest = text[matches[-1].end():]
  inner = last_boxed(rest)
  if inner is not None:
    return inner
  end = _SENTENCE_END.search(rest)
  answer = _clean(rest[:end.start()] if end else rest)
  return answer or None


def _answer_line(text: str) -> str | None:
  matches = list(_ANSWER_LINE.finditer(text))
  if not matches:
    return None
  answer = _clean(matches[-1].group("answer").strip(" \t*_"))
  return answer or None


def last_number(text: str) -> str | None:
  matches = _NUMBER.findall(text)
  if not matches:
    return None
  return re.sub(r"\s+", "", matches[-1]).replace(",", "")


def extract_answer(text: str, *, allow_last_number: bool = True) -> str | None:
  """The final answer of a completion by the rules in the module docstring, or None."""
  for rule in (last_boxed, _answer_is, _answer_line):
    answer = rule(text)
    if answer:
      return answer
  return last_number(text) if allow_last_number else None


# ------------------------------------------------------------------------ equivalence


class _Deadline(BaseException):
  """Raised by our SIGALRM handler; a BaseException so math-verify's `except Exception`
  blocks do not swallow it."""


class _NoTimeoutWarningFilter(logging.Filter):
  # We pass timeout=None to math-verify (our own timer covers the whole check), which makes
  # it warn once that timeouts are disabled. They are not; silence that one message.
  def filter(self, record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
  logging.getLogger(_name).addFilter(_NoTimeoutWarningFilter())


def _as_latex(answer: str) -> str:
  # Boxing makes math-verify's LaTeX extractor take the whole answer, delimiters or not.
  return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def _numbers_agree(gold: Any, pred: Any, rel_tol: float) -> bool:
  """False only when both are plain numbers that differ by more than `rel_tol` relative."""
  if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
    return True
  if not (gold.is_number and pred.is_number):
    return True
  g, p = sympy.N(gold, 30), sympy.N(pred, 30)
  undefined = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)
  if not (g.is_number and p.is_number) or g.has(*undefined) or p.has(*undefined):
    return True
  scale = sympy.Max(abs(g), abs(p))
  return bool(abs(g - p) <= sympy.Float(rel_tol, 30) * scale)


# Python refuses int<->str conversions past 4300 digits, and math-verify then keeps such a
# literal as a plain string: a correct 10**5000 written out failed against "10^{5000}". Raised
# during a check only, and bounded: the conversion is quadratic C code that the deadline
# cannot interrupt (~0.05 s at 100k digits). Process-wide while it lasts (other threads too).
MAX_INT_DIGITS = 100_000


@contextlib.contextmanager
def _int_digits(limit: int):
  old = sys.get_int_max_str_digits()
  sys.set_int_max_str_digits(0 if old == 0 else max(old, limit))  # 0 means unlimited
  try:
    yield
  finally:
    sys.set_int_max_str_digits(old)


def check_equivalent(gold: str, pred: str, *, rel_tol: float = 1e-4) -> tuple[bool, str]:
  """(equivalent, note). No deadline here: call through `equivalent()`."""
  if gold.strip() == pred.strip():
    return True, "identical"
  with _int_digits(MAX_INT_DIGITS):
    return _check_parsed(gold, pred, rel_tol)


def _check_parsed(gold: str, pred: str, rel_tol: float) -> tuple[bool, str]:
  gold_parsed = math_verify.parse(_as_latex(gold), parsing_timeout=None)
  pred_parsed = math_verify.parse(_as_latex(pred), parsing_timeout=None)
  if not gold_parsed:
    return False, "reference could not be parsed"
  if not pred_parsed:
    return False, "answer could not be parsed"
  if not math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None):
    return False, "not equivalent"
  if "%" not in gold + pred and not _numbers_agree(gold_parsed[0], pred_parsed[0], rel_tol):
    return False, "not equivalent (numbers differ beyond the relative tolerance)"
  return True, "equivalent"


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


def _equivalent_with_alarm(gold: str, pred: str, timeout_s: float,
                           rel_tol: float) -> tuple[bool, str]:
  def on_alarm(signum: int, frame: Any) -> None:
    # Keep firing every 50 ms in case a library swallows one interruption.
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    raise _Deadline()

  old_handler = signal.signal(signal.SIGALRM, on_alarm)
  try:
    signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3))
    try:
      return check_equivalent(gold, pred, rel_tol=rel_tol)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  except _Deadline:
    return False, f"timeout: comparison exceeded {timeout_s:g} s"
  finally:
    signal.signal(signal.SIGALRM, old_handler)


def _child_main(conn: Any, gold: str, pred: str, timeout_s: float, rel_tol: float) -> None:
  try:
    result = _equivalent_with_alarm(gold, pred, timeout_s, rel_tol)
  except Exception as e:
    result = (False, f"error: {type(e).__name__}: {e}")
  conn.send(result)
  conn.close()


def _equivalent_in_subprocess(gold: str, pred: str, timeout_s: float,
                              rel_tol: float) -> tuple[bool, str]:
  start = time.monotonic()
  ctx = base.mp_context()
  parent_conn, child_conn = ctx.Pipe(duplex=False)
  process = ctx.Process(target=_child_main, args=(child_conn, gold, pred, timeout_s, rel_tol),
                        daemon=True, name="mopd-math-check")
  process.start()
  child_conn.close()
  try:
    remaining = max(0.0, timeout_s - (time.monotonic() - start))
    if parent_conn.poll(remaining):
      try:
        return parent_conn.recv()
      except EOFError:
        return False, f"error: comparison process died (exit code {process.exitcode})"
    return False, f"timeout: comparison exceeded {timeout_s:g} s"
  finally:
    parent_conn.close()
    if process.is_alive():
      process.kill()
    process.join(timeout=5.0)


def equivalent(gold: str, pred: str, *, timeout_s: float = 5.0,
               rel_tol: float = 1e-4) -> tuple[bool, str]:
  """Whether `pred` equals `gold` mathematically, decided within `timeout_s` from any thread.

  Returns (equivalent, note); a timeout or an internal error counts as not equivalent.
  """
  if gold.strip() == pred.strip():
    return True, "identical"
  if _in_main_thread():
    try:
      return _equivalent_with_alarm(gold, pred, timeout_s, rel_tol)
    except Exception as e:
      return False, f"error: {type(e).__name__}: {e}"
  return _equivalent_in_subprocess(gold, pred, timeout_s, rel_tol)


# --------------------------------------------------------------------------- verifier


@dataclasses.dataclass(frozen=True)
class MathVerifier:
  """Reward 1 when the completion's final answer equals the reference, else 0.

  The feedback never contains the reference unless `reveal_reference` (the teacher context
  may include feedback; the gold answer would leak into it).
  """

  name: str = "math"
  timeout_s: float = 5.0
  rel_tol: float = 1e-4
  allow_last_number: bool = True
  reveal_reference: bool = False

  def __call__(self, example: Example, completion: str) -> Verdict:
    gold = str(example.reference)
    answer = extract_answer(completion, allow_last_number=self.allow_last_number)
    if answer is None:
      return failure_verdict("no final answer found (expected \\boxed{...})", extracted=None)
    ok, note = equivalent(gold, answer, timeout_s=self.timeout_s, rel_tol=self.rel_tol)
    details = {"extracted": answer, "note": note}
    if ok:
      return Verdict(reward=1.0, success=True, feedback="", details=details)
    # Clipped as the code verifier's feedback is: the answer is untrusted and may be huge.
    feedback = f"final answer {base.clip(answer, 300)} is incorrect"
    if note.startswith(("timeout", "error", "answer could not")):
      feedback += f" ({base.clip(note, 300)})"
    if self.reveal_reference:
      feedback += f"; expected {gold}"
    return Verdict(reward=0.0, success=False, feedback=feedback, details=details)


base.register_verifier(MathVerifier())
