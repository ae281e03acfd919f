"""Field rules: the type and range of one option, checked before anything reads it.

Shared by the run configuration (`config_lib.FIELD_RULES`, one rule per `ConfigDict` leaf) and
the typed option dataclasses (`losses.DistillConfig`, `losses.GRPOConfig`, ...), whose
`__post_init__` checks their fields with `check`. A rule's `problem(value)` is None for a good
value and says what is wrong otherwise, so nothing downstream meets a nan, an inf, a string or
a bool where a number belongs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Protocol

import ml_collections


class ConfigError(ValueError):
  """A run configuration field is bad; the message starts with `config.<field>: `."""


class FieldError(ValueError):
  """A typed option is bad. `field` is the dataclass field, so whoever built the dataclass from
  a run configuration can name the configuration's field instead (`methods.configured`)."""

  def __init__(self, owner: str, field: str, message: str):
    super().__init__(f"{owner}.{field}: {message}")
    self.owner, self.field, self.message = owner, field, message


class Rule(Protocol):
  def problem(self, v: Any) -> str | None: ...


def check(obj: Any, rules: Mapping[str, Rule]) -> None:
  """Raise `FieldError` for the first field of `obj` that breaks its rule."""
  for name, rule in rules.items():
    problem = rule.problem(getattr(obj, name))
    if problem is not None:
      raise FieldError(type(obj).__name__, name, problem)


@dataclasses.dataclass(frozen=True)
class Num:
  """An int or float field: finite, within [ge / gt, le / lt]; `also`: extra allowed values
  outside the range (None = off, -1 = inferred mesh axis, ...)."""

  kind: type  # int or float (a float field takes ints too; never bools or strings)
  ge: float | None = None
  gt: float | None = None
  le: float | None = None
  lt: float | None = None
  also: tuple = ()
  doc: str = ""  # the wording of "must be ...", when the derived one says too little

  def describe(self) -> str:
    if self.doc:
      return self.doc
    low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
    high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
    if low and high:
      text = f"in {low}, {high}"
    else:
      text = " ".join(x for x in (
          f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
          f"<= {self.le:g}" if self.le is not None else "", f"< {self.lt:g}" if self.lt is not None else "") if x)
    text = f"an int {text}" if self.kind is int else f"{text} (a finite number)"
    also = [repr(a) for a in self.also if a is not None]
    return " or ".join(also + [text] + (["None"] if None in self.also else []))

  def problem(self, v: Any) -> str | None:
    if any(v is a or (type(v) is type(a) and v == a) for a in self.also):
      return None
    want = numbers.Integral if self.kind is int else numbers.Real
    if isinstance(v, bool) or not isinstance(v, want) or not math.isfinite(v):
      return f"must be {self.describe()}, got {v!r}"
    if ((self.ge is not None and not v >= self.ge) or (self.gt is not None and not v > self.gt)
        or (self.le is not None and not v <= self.le) or (self.lt is not None and not v < self.lt)):
      return f"must be {self.describe()}, got {v!r}"
    return None


@dataclasses.dataclass(frozen=True)
class Flag:
  def problem(self, v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `choices` (a callable, so registries are read when validating): its values;
  `also`: extra allowed non-string values (None = off)."""

  choices: Any = None
  also: tuple = ()

  def problem(self, v: Any) -> str | None:
    if any(v is a for a in self.also):
      return None
    if not isinstance(v, str):
      return f"must be a string, got {v!r}"
    known = tuple(self.choices()) if self.choices else None
    if known is not None and v not in known:
      return f"unknown {v!r}; known: {sorted(known)}"
    return None


@dataclasses.dataclass(frozen=True)
class Seq:
  """A tuple or list (not a string) of items obeying `item`."""

  item: Any
  nonempty: bool = False
  doc: str = ""

  def problem(self, v: Any) -> str | None:
    doc = self.doc or f"a {'non-empty ' if self.nonempty else ''}sequence"
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or (self.nonempty and not v):
      return f"must be {doc}, got {v!r}"
    for x in v:
      if self.item.problem(x):
        return f"must be {doc}, got {tuple(v)!r} (item {x!r}: {self.item.problem(x)})"
    return None


@dataclasses.dataclass(frozen=True)
class Options:
  """Free-form keyword options, validated by whatever they are passed to."""

  def problem(self, v: Any) -> str | None:
    return None if isinstance(v, (dict, ml_collections.ConfigDict)) else f"must be a dict of options, got {v!r}"


COUNT = Num(int, ge=1)  # sizes, counts, periods that divide
NONNEG_INT = Num(int, ge=0)
POS = Num(float, gt=0)
NONNEG = Num(float, ge=0)
UNIT = Num(float, ge=0, le=1)  # [0, 1]
PROB = Num(float, gt=0, le=1)  # (0, 1]
