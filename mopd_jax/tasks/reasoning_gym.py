"""Seeded procedural tasks from reasoning-gym, and the "reasoning_gym" verifier.

`reasoning_gym_examples(dataset, size=, seed=, config=)` yields the entries of
`reasoning_gym.create_dataset(dataset, seed=seed, size=size, **config)` as Examples; the
same (dataset, seed, size, config) always gives the same examples.

Verification:
  - datasets with a unique numeric answer (basic_arithmetic, chain_sum) use the "math"
    verifier, reference = the answer string (prompt asks for \\boxed{}).
  - all others, e.g. countdown whose answers are not unique (any expression reaching the
    target with the given numbers), use the "reasoning_gym" verifier: the reference keeps
    the dataset name, its config and the generated entry (question, answer, metadata), and
    the verifier scores with the dataset's own `score_answer`. Its reward is that score
    (countdown: 1.0 solved, 0.05 wrong value or numbers, 0.01 unparsable; success means
    score >= 1). Prompt asks for <answer></answer> tags, reasoning-gym's convention.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Iterator, Mapping

import reasoning_gym  # ~1.5 s to import; workers do it before their first item, untimed.

from mopd_jax.tasks import MATH_FORMAT, TAGGED_ANSWER_FORMAT, PromptFormat, register_task
from mopd_jax.types import Example, Verdict, failure_verdict
from mopd_jax.verifiers import base
from mopd_jax.verifiers.math import last_boxed

# Datasets whose single answer the math verifier can judge.
MATH_VERIFIED = frozenset({"basic_arithmetic", "chain_sum"})

# Answers some datasets pass to `sympy.parse_expr` (which uses `eval`): only arithmetic may
# reach it.
_ARITHMETIC = re.compile(r"[0-9\s+\-*/().]{1,500}")
ANSWER_GUARDS: dict[str, re.Pattern[str]] = {"countdown": _ARITHMETIC}


@dataclasses.dataclass(frozen=True)
class ReasoningGymReference:
  """What the "reasoning_gym" verifier needs to rebuild the scorer and the entry."""

  dataset: str
  entry: Mapping[str, Any]  # {"question", "answer", "metadata"} as generated
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _entries(dataset: str, size: int, seed: int,
             config: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
  data = reasoning_gym.create_dataset(dataset, seed=seed, size=size, **dict(config))
  for i in range(size):
    yield data[i]


@register_task("reasoning_gym")
def reasoning_gym_examples(dataset: str = "basic_arithmetic", *, size: int = 100,
                           seed: int = 0, config: Mapping[str, Any] | None = None,
                           verifier: str | None = None,
                           prompt_format: PromptFormat | None = None) -> Iterator[Example]:
  """`size` examples of reasoning-gym `dataset`, generated from `seed`.

  `config`: extra dataset options (e.g. {"min_numbers": 3}). `verifier`: "math" or
  "reasoning_gym" (default by dataset, see module docstring).
  """
  config = dict(config or {})
  verifier = verifier or ("math" if dataset in MATH_VERIFIED else "reasoning_gym")
  if verifier not in ("math", "reasoning_gym"):
    raise ValueError(f"verifier must be 'math' or 'reasoning_gym', got {verifier!r}")
  fmt = prompt_format or (MATH_FORMAT if verifier == "math" else TAGGED_ANSWER_FORMAT)
  for i, entry in enumerate(_entries(dataset, size, seed, config)):
    if verifier == "math":
      reference: Any = str(entry["answer"])
    else:
      reference = ReasoningGymReference(dataset=dataset, entry=entry, config=config)
    yield Example(prompt=fmt.messages(entry["question"]), reference=reference,
                  verifier=verifier,
                  metadata={"task": "reasoning_gym", "dataset": dataset, "seed": seed,
                            "index": i},
                  example_id=f"rg/{dataset}/{seed}/{i}")


for _name in ("basic_arithmetic", "chain_sum", "countdown"):
  register_task(_name)(functools.partial(reasoning_gym_examples, _name))


# --------------------------------------------------------------------------- verifier

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_tagged_answer(completion: str) -> str | None:
  """The last <answer>...</answer>, else the last \\boxed{}, else a one-line completion."""
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    return tags[-1].strip()
  boxed = last_boxed(completion)
  if boxed is not None:
    return boxed
  text = completion.strip()
  return text if text and "\n" not in text else None


@functools.lru_cache(maxsize=64)
def _scorer(dataset: str, config_json: str) -> Any:
  return reasoning_gym.create_dataset(dataset, size=1, seed=0,
                                      **json.loads(config_json)).score_answer


@dataclasses.dataclass(frozen=True)
class ReasoningGymVerifier:
  """Scores with the dataset's own `score_answer`; success when the score reaches 1."""

  name: str = "reasoning_gym"

  def __call__(self, example: Example, completion: str) -> Verdict:
    reference = example.reference
    if not isinstance(reference, ReasoningGymReference):
      return failure_verdict("reasoning_gym reference must be a ReasoningGymReference, "
                             f"got {type(reference).__name__}")
    answer = extract_tagged_answer(completion)
    if answer is None:
      return failure_verdict("no final answer found (expected <answer>...</answer>)")
    guard = ANSWER_GUARDS.get(reference.dataset)
    if guard is not None and not guard.fullmatch(answer):
      return failure_verdict(f"answer {answer!r} is not a plain arithmetic expression",
                             extracted=answer)
    score_answer = _scorer(reference.dataset, json.dumps(dict(reference.config), sort_keys=True))
    score = float(score_answer(answer, dict(reference.entry)))
    score = min(1.0, max(0.0, score))
    success = score >= 1.0
    feedback = "" if success else f"answer {answer} is incorrect (score {score:g})"
    return Verdict(reward=score, success=success, feedback=feedback,
                   details={"extracted": answer, "score": score})


base.register_verifier(ReasoningGymVerifier())
