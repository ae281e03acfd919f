"""Multiple-choice verifier: extract the chosen letter, compare with the gold letter.

Reference: a `ChoiceReference(answer="C", letters="ABCD")`, or just the gold letter as a
string (allowed letters then A-J).

Extraction looks for the final answer in this order and uses the first that is present:
  1. the last `\\boxed{...}`,
  2. the last "the (final/correct) answer is ..." clause,
  3. the last "Answer: ..." line,
  4. a completion that is only a letter ("C", "(C)", "C.", "**C**"),
  5. the last line that names options in parentheses ("... so (C)").
Within that span every allowed letter that stands alone (as "C", "(C)", "C)", "C.") counts.
Choosing more than one distinct letter is a failure ("A or C", "\\boxed{A, C}"), so hedging
never earns a reward. A clause stops at the end of its sentence or at "because"/"since",
so "The answer is C because A is wrong" chooses C.
"""

from __future__ import annotations

import dataclasses
import re

from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import base
from mopd_jax.verifiers.math import last_boxed

DEFAULT_LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class ChoiceReference:
  answer: str  # the gold letter
  letters: str = "ABCD"  # the allowed letters, in order

  def __post_init__(self):
    if len(self.answer) != 1 or self.answer not in self.letters:
      raise ValueError(f"gold letter {self.answer!r} is not one of {self.letters!r}")


def as_choice_reference(reference: object) -> ChoiceReference:
  if isinstance(reference, ChoiceReference):
    return reference
  if isinstance(reference, str):
    return ChoiceReference(answer=reference.strip().upper(), letters=DEFAULT_LETTERS)
  raise TypeError(f"multiple_choice reference must be a ChoiceReference or a letter, "
                  f"got {type(reference).__name__}")


_ANSWER_IS = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+|correct\s+|best\s+)?answer\s+is\s*:?")
_ANSWER_LINE = re.compile(r"(?im)^[ \t>#*_]*(?:final\s+)?answer[ \t*_]*[:：](?P<rest>.*)$")
# A clause ends at a sentence end, a semicolon, a newline or a justification.
_CLAUSE_END = re.compile(r"(?i)\.(?:\s|$)|;|\n|\b(?:because|since|as\s+it|as\s+the|which)\b")
_ONLY_LETTER = re.compile(r"^[\s*_`(\[{]*(?:option\s+)?([A-Z])[\s*_`)\]}.:]*$", re.IGNORECASE)


def _letters_in(span: str, letters: str) -> list[str]:
  """Allowed letters standing alone in `span`, in order of appearance."""
  pattern = re.compile(rf"(?<![A-Za-z0-9])([{re.escape(letters)}])(?![A-Za-z0-9])")
  return [m.group(1) for m in pattern.finditer(span)]


def _clause(rest: str) -> str:
  end = _CLAUSE_END.search(rest)
  return rest[:end.start()] if end else rest


def answer_span(text: str) -> str | None:
  """The part of `text` holding the final choice, by the rules of the module docstring."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    return _clause(text[matches[-1].end():])
  matches = list(_ANSWER_LINE.finditer(text))
  if matches:
    return _clause(matches[-1].group("rest"))
  only = _ONLY_LETTER.match(text)
  if only:
    return only.group(1).upper()
  for line in reversed(text.strip().splitlines()):
    if re.search(r"\([A-Z]\)", line):
      return " ".join(re.findall(r"\(([A-Z])\)", line))
  return None


def extract_choices(text: str, letters: str = DEFAULT_LETTERS) -> list[str]:
  """Distinct allowed letters chosen by the completion (empty: none found)."""
  span = answer_span(text)
  if span is None:
    return []
  if re.fullmatch(r"\s*\\text\{\s*\(?([A-Za-z])\)?\s*\}\s*", span):  # \boxed{\text{(C)}}
    span = re.sub(r"\\text\{(.*)\}", r"\1", span)
  chosen = _letters_in(span, letters)
  if not chosen:  # A lowercase single letter is accepted only when it is the whole span.
    lone = re.fullmatch(r"[\s(]*([a-z])[\s).]*", span)
    if lone and lone.group(1).upper() in letters:
      chosen = [lone.group(1).upper()]
  return list(dict.fromkeys(chosen))


@dataclasses.dataclass(frozen=True)
class MultipleChoiceVerifier:
  """Reward 1 when exactly one letter is chosen and it is the gold one."""

  name: str = "multiple_choice"
  reveal_reference: bool = False  # feedback may reach the teacher context

  def __call__(self, example: Example, completion: str) -> Verdict:
    reference = as_choice_reference(example.reference)
    chosen = extract_choices(completion, reference.letters)
    details = {"chosen": tuple(chosen)}
    if not chosen:
      return failure_verdict(f"no answer letter ({', '.join(reference.letters)}) found",
                             **details)
    if len(chosen) > 1:
      return failure_verdict(f"more than one answer chosen ({', '.join(chosen)}); "
                             "choose exactly one", **details)
    if chosen[0] == reference.answer:
      return Verdict(reward=1.0, success=True, details=details)
    feedback = f"answer {chosen[0]} is incorrect"
    if self.reveal_reference:
      feedback += f"; the correct answer is {reference.answer}"
    return Verdict(reward=0.0, success=False, feedback=feedback, details=details)


base.register_verifier(MultipleChoiceVerifier())
