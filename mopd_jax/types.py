"""Host-side records shared by tasks, verifiers, peers and the trainer.

These are plain frozen dataclasses (host data, never traced). Device pytrees live
next to the code that builds them (`flax.struct.dataclass`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat message."""

  role: str  # "system" | "user" | "assistant" | "tool"
  content: str

  def as_dict(self) -> dict[str, str]:
    return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt of a task, with what its verifier needs to judge a completion.

  `reference` is verifier-specific (an answer string, a test suite, ground-truth
  calls, ...); `verifier` names the registered verifier that understands it.
  """

  prompt: tuple[Message, ...]
  reference: Any
  verifier: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  example_id: str = ""


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A verifier's judgement of one completion. Never an exception."""

  reward: float  # in [0, 1]
  success: bool
  feedback: str = ""  # human-readable: failing test, error message; may be empty
  details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not 0.0 <= self.reward <= 1.0:
      raise ValueError(f"Verdict.reward must be in [0, 1], got {self.reward}")


def failure_verdict(reason: str, **details: Any) -> Verdict:
  """The verdict for anything that went wrong while verifying: reward 0, reason kept."""
  return Verdict(reward=0.0, success=False, feedback=reason, details=dict(details))
