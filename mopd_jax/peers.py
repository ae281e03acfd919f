"""Peer selection and teacher-context construction (MOPD spec, section 2).

For every rollout i of a prompt's group this builds the messages the teacher scores
`response_i` under, from i's *peers* (the other rollouts of the same prompt) and the
verifier's feedback on i:

  system / earlier messages of the original prompt, unchanged
  user:  <original problem text>

         <label line>            one section per present part, in the order
         <peer text>             primary, summaries, another, failure, feedback
         ...
         Correctly solve the original question.

A rollout whose context got nothing (no peer, no feedback) keeps the original prompt
unchanged and gets `distill_mask = 0`: its teacher would be the student itself.

Everything here is host Python, deterministic for a (seed, step, group index,
rollout index): each rollout draws from its own numpy Generator, so results do not
depend on how the batch is split over processes, nor on the other rollouts.

Decisions not fixed by the spec (see also the option docs on `PeerConfig`):
- The problem text is the content of the prompt's *last* user message; every message
  before it (system messages, few-shot turns) is kept unchanged. A prompt must end with
  a user message.
- Identity is by index: "own response" and "different from the primary" mean a different
  rollout index, not different text (identical texts are not de-duplicated).
- "No primary exists" means no success remains in S after self-exclusion, whatever
  `include_primary` says; it drives `failure_condition='when_no_solution'` and
  `feedback_only_without_solution`.
- Feedback is only given to a *failed* rollout with a non-empty feedback text (its label
  calls the attempt unsuccessful).
- Control slots (`random_peer`, `unrelated_prompt`, `success_only_matched`) all use the
  neutral `labels.control` ("Example solution:") so a label never leaks a verdict or
  whether the text answers this problem; only the content differs between controls.
- The length checked against `max_teacher_prompt_len` is `count_prompt_tokens(messages)`
  of the whole teacher prompt. The trainer passes the chat-templated token count (what
  the teacher's bucket holds, as the authors truncate templated tokens); without it the
  sum of `count_tokens` over the messages' contents stands in (no template tokens).
- Truncation acts only on the section texts (feedback included); the problem text, the
  label lines of surviving sections and the closing line are never cut. See `_truncate`.
- Summaries variant (`use_summaries`), as the authors run it (docs/SPEC_VS_AUTHORS.md):
  the student's prompt gets `labels.summary_instruction` (`student_prompt`, training
  rollouts only), the primary stays in full and the summaries are of the *other* peers of
  the pool (never the primary shown in full; self as `exclude_self_success` says for a
  success, never for a failure). The trainer gives `Group.prompt`
  as the student sampled it, so the teacher's problem text carries the instruction too
  (`summary_instruction_to_teacher`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mopd_jax.types import Message, Verdict

CountTokens = Callable[[str], int]
# Length of a whole prompt (a message list); in training the chat-templated token count.
CountPromptTokens = Callable[[Sequence[Message]], int]

# Section kinds, in layout order (controls take the place of the peer sections).
PRIMARY = "primary"
SUMMARIES = "summaries"
ANOTHER = "another"
FAILURE = "failure"
CONTROL = "control"
FEEDBACK = "feedback"

FAILURE_CONDITIONS = ("always", "when_no_solution")
TRUNCATIONS = ("left", "right", "error")
CONTROLS = ("random_peer", "unrelated_prompt", "success_only_matched")
CONTROL_MATCHES = ("block", "token")
SUMMARY_SOURCES = ("successes", "failures", "all")


def approx_token_count(text: str) -> int:
  """A tokenizer-free estimate: max(whitespace words, ceil(chars / 4)).

  Non-decreasing in prefix length and grows by at most 1 per character, so the
  binary searches below can hit any budget exactly. Pass the real tokenizer's
  count to `build_teacher_contexts` in training.
  """
  return max(len(text.split()), -(-len(text) // 4))


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Group:
  """The G rollouts of one prompt: the prompt, each response text and its verdict."""

  prompt: tuple[Message, ...]
  responses: tuple[str, ...]
  verdicts: tuple[Verdict, ...]

  def __post_init__(self):
    # Accept lists from callers; keep the record immutable.
    for name in ("prompt", "responses", "verdicts"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not self.responses:
      raise ValueError("Group.responses: a group needs at least one rollout")
    if len(self.responses) != len(self.verdicts):
      raise ValueError(f"Group: {len(self.responses)} responses but {len(self.verdicts)} verdicts")
    if not all(isinstance(m, Message) for m in self.prompt):
      raise ValueError("Group.prompt: every element must be a mopd_jax.types.Message")
    if not self.prompt or self.prompt[-1].role != "user":
      raise ValueError("Group.prompt must end with a user message (the problem text)")

  def __len__(self) -> int:
    return len(self.responses)

  @property
  def successes(self) -> tuple[int, ...]:
    return tuple(j for j, v in enumerate(self.verdicts) if v.success)

  @property
  def failures(self) -> tuple[int, ...]:
    return tuple(j for j, v in enumerate(self.verdicts) if not v.success)


@dataclasses.dataclass(frozen=True)
class PeerRef:
  """Where a peer text came from: `groups[group].responses[index]`."""

  group: int  # position in the `groups` sequence given to build_teacher_contexts
  index: int


@dataclasses.dataclass(frozen=True)
class Section:
  """One labelled part of the teacher message (text as rendered, after truncation)."""

  kind: str  # PRIMARY | SUMMARIES | ANOTHER | FAILURE | CONTROL | FEEDBACK
  label: str
  text: str
  peers: tuple[PeerRef, ...]  # empty for feedback; one per item for summaries


@dataclasses.dataclass(frozen=True)
class TeacherContext:
  """The teacher's prompt for one rollout and what went into it."""

  group: int  # position of the rollout's group in `groups`
  rollout: int  # index of the rollout in its group
  messages: tuple[Message, ...]
  distill_mask: float  # 1.0 when something was added (or distill_without_context), else 0.0
  sections: tuple[Section, ...]  # what was added, in layout order
  truncated: bool  # sections were shortened or dropped to fit max_teacher_prompt_len
  num_tokens: int  # the teacher prompt's length as `count_prompt_tokens` measures it

  @property
  def kinds(self) -> tuple[str, ...]:
    return tuple(s.kind for s in self.sections)

  @property
  def peers(self) -> tuple[PeerRef, ...]:
    return tuple(p for s in self.sections for p in s.peers)

  def section(self, kind: str) -> Section | None:
    return next((s for s in self.sections if s.kind == kind), None)

  def peer_index(self, kind: str) -> int | None:
    """Index in the own group of the single peer of a PRIMARY/ANOTHER/FAILURE section."""
    s = self.section(kind)
    return s.peers[0].index if s is not None and s.peers else None


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class PeerLabels:
  """Label lines and the closing instruction; the defaults are the spec's reference text."""

  primary: str = "Correct solution:"
  another: str = "Another successful solution:"
  failure: str = "A known failed solution (avoid repeating this mistake):"
  feedback: str = "The following is feedback from your unsuccessful earlier attempt:"
  closing: str = "Correctly solve the original question."
  # Neutral on purpose: control slots must not say whether a text succeeded or even
  # answers this problem, so controls differ from each other only by content.
  control: str = "Example solution:"
  summaries_successes: str = "Summaries of successful solutions:"
  summaries_failures: str = "Summaries of failed solutions (avoid these approaches):"
  summaries_all: str = "Summaries of other attempts:"
  # Item templates; "{summary}" is replaced by the summary text.
  summary_item: str = "- {summary}"
  summary_item_success: str = "- (successful) {summary}"  # used when summaries_from='all'
  summary_item_failure: str = "- (failed) {summary}"  # used when summaries_from='all'
  # Appended (after `separator`) to the student's last user message when use_summaries is on,
  # so responses end with the summary peers are given; the authors' wording. "" = none (a task
  # whose prompt already asks for one).
  summary_instruction: str = ("After your answer, briefly summarize your key approach in one sentence "
                              "inside <summary> tags, e.g. <summary>...</summary>.")
  separator: str = "\n\n"  # between problem text, sections and the closing line

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if not isinstance(getattr(self, f.name), str):
        raise ValueError(f"PeerLabels.{f.name} must be a string, got {getattr(self, f.name)!r}")
    for name in ("summary_item", "summary_item_success", "summary_item_failure"):
      if "{summary}" not in getattr(self, name):
        raise ValueError(f"PeerLabels.{name} must contain '{{summary}}', got {getattr(self, name)!r}")


_BOOL_FIELDS = (
    "exclude_self_success", "include_primary", "include_another", "include_failure",
    "include_feedback", "feedback_only_without_solution", "strip_thinking", "use_summaries",
    "summaries_replace_solutions", "summary_instruction_to_teacher", "distill_without_context")


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  """Every option of the spec's section 2. Defaults are MOPD 2S1F (preset `mopd_2s1f`)."""

  exclude_self_success: bool = True  # i's own response never appears in its context
  include_primary: bool = True  # first success in S (after exclusion)
  include_another: bool = True  # next success in S after the primary
  include_failure: bool = True  # a failed peer, uniform from F minus i
  failure_condition: str = "always"  # 'always' | 'when_no_solution' (only if no primary exists)
  include_feedback: bool = True  # the verifier's feedback on i itself (failed i only)
  feedback_only_without_solution: bool = True  # feedback only when no primary exists
  strip_thinking: bool = False  # remove <think>...</think> from demonstrations
  max_teacher_prompt_len: int = 10240  # tokens of the teacher prompt (`count_prompt_tokens`)
  truncation: str = "right"  # 'left' | 'right' | 'error'
  labels: PeerLabels = PeerLabels()
  # Matched-budget controls: replace the peer sections by `control` slots holding as many
  # blocks ('block') or as many peer-text tokens ('token') as 2S1F would have had.
  control: str | None = None  # None | 'random_peer' | 'unrelated_prompt' | 'success_only_matched'
  control_match: str = "block"  # 'block' | 'token'
  # Summaries variant: the student is asked for a trailing <summary>...</summary> (see
  # `student_prompt`); the teacher gets k summaries of peers after the primary solution.
  use_summaries: bool = False
  summaries_k: int = 3
  summaries_from: str = "successes"  # 'successes' | 'failures' | 'all' (the authors' default: successes)
  # True: summaries *instead of* the full primary/another/failure texts (an earlier reading of
  # the spec, kept as an ablation); the authors and the spec keep the primary.
  summaries_replace_solutions: bool = False
  # The teacher's problem text keeps the student's summary instruction (the authors': the
  # response it scores ends with the summary the instruction asked for). False: the original text.
  summary_instruction_to_teacher: bool = True
  # Plain OPD: the teacher is external, so the plain prompt still carries signal.
  distill_without_context: bool = False
  seed: int = 0

  def __post_init__(self):
    for name in _BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"PeerConfig.{name} must be a bool, got {getattr(self, name)!r}")
    _check_choice("failure_condition", self.failure_condition, FAILURE_CONDITIONS)
    _check_choice("truncation", self.truncation, TRUNCATIONS)
    _check_choice("control_match", self.control_match, CONTROL_MATCHES)
    _check_choice("summaries_from", self.summaries_from, SUMMARY_SOURCES)
    if self.control is not None:
      _check_choice("control", self.control, CONTROLS)
    _check_int("max_teacher_prompt_len", self.max_teacher_prompt_len, minimum=1)
    _check_int("summaries_k", self.summaries_k, minimum=1)
    _check_int("seed", self.seed, minimum=0)
    if not isinstance(self.labels, PeerLabels):
      raise ValueError(f"PeerConfig.labels must be a PeerLabels, got {type(self.labels).__name__}")
    if self.control is not None and self.use_summaries:
      raise ValueError("PeerConfig.use_summaries cannot be combined with PeerConfig.control "
                       f"({self.control!r}): controls replace every peer section")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> PeerConfig:
    """Builds a config from a dict / ConfigDict; an optional 'preset' key is the base."""
    values = _as_dict(values)
    base = get_preset(values.pop("preset")) if values.get("preset") else cls()
    values.pop("preset", None)
    return _replace(base, values)


def _replace(base: PeerConfig, values: Mapping[str, Any]) -> PeerConfig:
  """`base` with option overrides; `labels` may be a partial mapping of label names."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(PeerConfig)}
  for key in values:
    if key not in known:
      raise ValueError(f"PeerConfig: unknown option {key!r}; known: {sorted(known)}")
  if "labels" in values and not isinstance(values["labels"], PeerLabels):
    labels = _as_dict(values["labels"])
    label_names = {f.name for f in dataclasses.fields(PeerLabels)}
    for key in labels:
      if key not in label_names:
        raise ValueError(f"PeerConfig.labels: unknown label {key!r}; known: {sorted(label_names)}")
    values["labels"] = dataclasses.replace(base.labels, **labels)
  return dataclasses.replace(base, **values)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"PeerConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"PeerConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _as_dict(values: Any) -> dict[str, Any]:
  # ConfigDict is not a Mapping subclass but has items().
  return dict(values.items()) if hasattr(values, "items") else dict(values)


# ----------------------------------------------------------------------------- presets

PEER_PRESETS: dict[str, Callable[[], PeerConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], PeerConfig]], Callable[[], PeerConfig]]:
  def register(fn: Callable[[], PeerConfig]) -> Callable[[], PeerConfig]:
    if name in PEER_PRESETS:
      raise ValueError(f"peer preset {name!r} is already registered")
    PEER_PRESETS[name] = fn
    return fn
  return register


def get_preset(name: str, **overrides: Any) -> PeerConfig:
  """The named preset, with field overrides (e.g. seed=3, labels={'closing': '...'})."""
  if name not in PEER_PRESETS:
    raise ValueError(f"unknown peer preset {name!r}; known: {sorted(PEER_PRESETS)}")
  return _replace(PEER_PRESETS[name](), overrides)


@register_preset("mopd_2s1f")
def _mopd_2s1f() -> PeerConfig:
  """The paper's best: primary + another success + a failure, failure always."""
  return PeerConfig()


@register_preset("positive_only")
def _positive_only() -> PeerConfig:
  """Positive peer imitation: primary + another success, no failure."""
  return PeerConfig(include_failure=False)


@register_preset("sdpo")
def _sdpo() -> PeerConfig:
  """SDPO (prior method): primary only; feedback when no primary exists."""
  return PeerConfig(include_another=False, include_failure=False, include_feedback=True,
                    feedback_only_without_solution=True)


@register_preset("plain_opd")
def _plain_opd() -> PeerConfig:
  """Plain OPD: the (external) teacher sees the original prompt only; every rollout distils."""
  return PeerConfig(include_primary=False, include_another=False, include_failure=False,
                    include_feedback=False, distill_without_context=True)


@register_preset("summaries")
def _summaries() -> PeerConfig:
  """The authors' summaries variant: primary solution, then summaries of the other successes."""
  return PeerConfig(include_another=False, include_failure=False, use_summaries=True)


@register_preset("random_peer")
def _random_peer() -> PeerConfig:
  return PeerConfig(control="random_peer")


@register_preset("unrelated_prompt")
def _unrelated_prompt() -> PeerConfig:
  return PeerConfig(control="unrelated_prompt")


@register_preset("success_only_matched")
def _success_only_matched() -> PeerConfig:
  return PeerConfig(control="success_only_matched")


# ---------------------------------------------------------------------- text utilities

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SUMMARY = re.compile(r"<summary>(.*?)</summary>", re.DOTALL)


def strip_thinking(text: str) -> str:
  """Removes `<think>...</think>` blocks.

  A leading `</think>` with no opener (templates that open the block in the prompt)
  drops everything before it; an unclosed `<think>` (response cut at max length) drops
  everything after it: both are reasoning, not the demonstration.
  """
  close, open_ = text.find("</think>"), text.find("<think>")
  if close >= 0 and (open_ < 0 or close < open_):
    text = text[close + len("</think>"):]
  text = _THINK_BLOCK.sub("", text)
  open_ = text.find("<think>")
  if open_ >= 0:
    text = text[:open_]
  return text.strip()


def extract_summary(text: str) -> str | None:
  """The last `<summary>...</summary>` of a response's final answer (thinking ignored)."""
  found = _SUMMARY.findall(strip_thinking(text))
  summary = found[-1].strip() if found else ""
  return summary or None


def _with_summary_instruction(content: str, labels: PeerLabels) -> str:
  return labels.separator.join([content, labels.summary_instruction])


def student_prompt(prompt: Sequence[Message], config: PeerConfig) -> tuple[Message, ...]:
  """The prompt the student samples from (and is trained on) in training.

  With `use_summaries` its last user message ends with `labels.summary_instruction`, so
  responses carry the `<summary>` the teacher contexts are built from; otherwise `prompt`.
  Evaluation samples the task's own prompt (the authors add the instruction in training only).
  """
  prompt = tuple(prompt)
  if not config.use_summaries or not config.labels.summary_instruction:
    return prompt
  last = max((k for k, m in enumerate(prompt) if m.role == "user"), default=None)
  if last is None:
    raise ValueError("student_prompt: the prompt has no user message to append the summary instruction to")
  content = _with_summary_instruction(prompt[last].content, config.labels)
  return prompt[:last] + (Message("user", content),) + prompt[last + 1:]


def _teacher_base(prompt: tuple[Message, ...], config: PeerConfig) -> tuple[Message, ...]:
  """The prompt the teacher's sections extend: the student's, or (summary_instruction_to_teacher
  False) the student's without the summary instruction `student_prompt` appended."""
  if not config.use_summaries or config.summary_instruction_to_teacher or not config.labels.summary_instruction:
    return prompt
  *kept, last = prompt
  suffix = _with_summary_instruction("", config.labels)
  if last.content.endswith(suffix):
    last = Message(last.role, last.content[:-len(suffix)])
  return (*kept, last)


def _demo_text(text: str, config: PeerConfig) -> str:
  return strip_thinking(text) if config.strip_thinking else text.strip()


def _render_user(problem: str, sections: Sequence[Section], labels: PeerLabels) -> str:
  parts = [problem] + [f"{s.label}\n{s.text}" for s in sections] + [labels.closing]
  return labels.separator.join(parts)


def _longest_within(text: str, budget: int, count_tokens: CountTokens, keep_end: bool) -> str:
  """Longest prefix (or suffix) of `text` whose token count is <= budget (binary search)."""
  piece = (lambda n: text[len(text) - n:]) if keep_end else (lambda n: text[:n])
  lo, hi = 0, len(text)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count_tokens(piece(mid)) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return piece(lo)


# -------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class _Candidates:
  primary: int | None
  another: int | None
  failure: int | None  # None when not drawn or F minus i is empty


@dataclasses.dataclass(frozen=True)
class _Rngs:
  """Independent streams per purpose, so enabling one option never shifts another's draws."""

  failure: np.random.Generator
  summaries: np.random.Generator
  control: np.random.Generator


def _rollout_rngs(seed: int, step: int, group_index: int, rollout: int) -> _Rngs:
  children = np.random.SeedSequence([seed, step, group_index, rollout]).spawn(3)
  return _Rngs(*(np.random.default_rng(c) for c in children))


def _successes_for(group: Group, i: int, exclude_self: bool) -> list[int]:
  return [j for j in group.successes if not (exclude_self and j == i)]


def _candidates(group: Group, i: int, exclude_self: bool, draw_failure: bool,
                failure_rng: np.random.Generator) -> _Candidates:
  succ = _successes_for(group, i, exclude_self)
  primary = succ[0] if succ else None
  another = succ[1] if len(succ) > 1 else None
  failure = None
  fails = [j for j in group.failures if j != i]
  if draw_failure and fails:
    failure = fails[int(failure_rng.integers(len(fails)))]
  return _Candidates(primary, another, failure)


def _peer_section(kind: str, label: str, groups: Sequence[Group], ref: PeerRef,
                  config: PeerConfig) -> Section:
  text = _demo_text(groups[ref.group].responses[ref.index], config)
  return Section(kind, label, text, (ref,))


def _summaries_section(groups: Sequence[Group], pos: int, i: int, config: PeerConfig,
                       rng: np.random.Generator, shown: int | None) -> Section | None:
  """k summaries drawn from the pool; `shown` (the primary, given in full) is not summarised again."""
  group, labels = groups[pos], config.labels
  succ = set(_successes_for(group, i, config.exclude_self_success))
  fails = {j for j in group.failures if j != i}
  pool = {"successes": succ, "failures": fails, "all": succ | fails}[config.summaries_from] - {shown}
  found = {j: extract_summary(group.responses[j]) for j in sorted(pool)}
  eligible = [j for j, s in found.items() if s is not None]
  if not eligible:
    return None
  k = min(config.summaries_k, len(eligible))
  chosen = sorted(int(j) for j in rng.choice(eligible, size=k, replace=False))
  items = []
  for j in chosen:
    if config.summaries_from == "all":
      template = labels.summary_item_success if group.verdicts[j].success else labels.summary_item_failure
    else:
      template = labels.summary_item
    items.append(template.replace("{summary}", found[j]))
  label = {"successes": labels.summaries_successes, "failures": labels.summaries_failures,
           "all": labels.summaries_all}[config.summaries_from]
  return Section(SUMMARIES, label, "\n".join(items), tuple(PeerRef(pos, j) for j in chosen))


def _method_sections(groups: Sequence[Group], pos: int, i: int, config: PeerConfig,
                     rngs: _Rngs) -> tuple[list[Section], bool]:
  """The peer sections of the non-control modes, and whether a primary exists."""
  group, labels = groups[pos], config.labels
  solutions = not (config.use_summaries and config.summaries_replace_solutions)
  succ = _successes_for(group, i, config.exclude_self_success)
  failure_allowed = config.failure_condition == "always" or not succ
  cand = _candidates(group, i, config.exclude_self_success,
                     draw_failure=solutions and config.include_failure and failure_allowed,
                     failure_rng=rngs.failure)
  sections = []
  shown = cand.primary if solutions and config.include_primary else None
  if shown is not None:
    sections.append(_peer_section(PRIMARY, labels.primary, groups, PeerRef(pos, shown), config))
  if config.use_summaries:
    summaries = _summaries_section(groups, pos, i, config, rngs.summaries, shown)
    if summaries is not None:
      sections.append(summaries)
  if solutions and config.include_another and cand.another is not None:
    sections.append(_peer_section(ANOTHER, labels.another, groups, PeerRef(pos, cand.another), config))
  if cand.failure is not None:
    sections.append(_peer_section(FAILURE, labels.failure, groups, PeerRef(pos, cand.failure), config))
  return sections, cand.primary is not None


# --------------------------------------------------------------------------- controls


def control_budget(group: Group, i: int, config: PeerConfig, *, step: int = 0, group_index: int = 0,
                   count_tokens: CountTokens = approx_token_count) -> tuple[int, int]:
  """(blocks, peer-text tokens) the 2S1F context would have had for rollout i.

  Draws from the same failure stream as the 2S1F run with this seed, step and global
  group index, so the token budget is that of the failure 2S1F actually picks. Label
  lines are not counted (fixed overhead); feedback is not a block.
  """
  failure_rng = _rollout_rngs(config.seed, step, group_index, i).failure
  cand = _candidates(group, i, config.exclude_self_success, draw_failure=True, failure_rng=failure_rng)
  picked = [j for j in (cand.primary, cand.another, cand.failure) if j is not None]
  tokens = sum(count_tokens(_demo_text(group.responses[j], config)) for j in picked)
  return len(picked), tokens


def _other_successes(groups: Sequence[Group], pos: int) -> list[PeerRef]:
  # "Other prompts": other groups whose prompt differs (a repeated prompt is not unrelated).
  own = groups[pos].prompt
  return [PeerRef(q, j) for q, g in enumerate(groups) if q != pos and g.prompt != own
          for j in g.successes]


def _shuffled(refs: list[PeerRef], rng: np.random.Generator) -> list[PeerRef]:
  return [refs[k] for k in rng.permutation(len(refs))]


def _control_pool(groups: Sequence[Group], pos: int, i: int, config: PeerConfig,
                  rng: np.random.Generator) -> list[PeerRef]:
  """Candidate peers in the order slots are filled."""
  if config.control == "random_peer":  # any label, self always excluded
    return _shuffled([PeerRef(pos, j) for j in range(len(groups[pos])) if j != i], rng)
  if config.control == "unrelated_prompt":
    return _shuffled(_other_successes(groups, pos), rng)
  # success_only_matched: same-prompt successes in index order (primary first), then
  # random successes of other prompts to top up.
  same = [PeerRef(pos, j) for j in _successes_for(groups[pos], i, config.exclude_self_success)]
  return same + _shuffled(_other_successes(groups, pos), rng)


def _control_sections(groups: Sequence[Group], pos: int, group_index: int, i: int,
                      config: PeerConfig, step: int, rngs: _Rngs,
                      count_tokens: CountTokens) -> list[Section]:
  blocks, tokens = control_budget(groups[pos], i, config, step=step, group_index=group_index,
                                  count_tokens=count_tokens)
  pool = _control_pool(groups, pos, i, config, rngs.control)
  texts = ((ref, _demo_text(groups[ref.group].responses[ref.index], config)) for ref in pool)
  if config.control_match == "block":
    filled = _fill_blocks(texts, blocks)
  else:
    filled = _fill_tokens(texts, tokens, count_tokens)
  return [Section(CONTROL, config.labels.control, text, (ref,)) for ref, text in filled]


def _fill_blocks(texts: Iterator[tuple[PeerRef, str]], blocks: int) -> list[tuple[PeerRef, str]]:
  return [item for _, item in zip(range(blocks), texts)]


def _fill_tokens(texts: Iterable[tuple[PeerRef, str]], budget: int,
                 count_tokens: CountTokens) -> list[tuple[PeerRef, str]]:
  """Whole texts while they fit, then the head of the next one up to the budget.

  Empty texts are skipped. With a count that grows by at most one per character (real
  tokenizers, `approx_token_count`) the texts' counts sum to the budget when the pool
  is large enough (less if the cut piece ends in whitespace, which is dropped).
  """
  out, left = [], budget
  for ref, text in texts:
    if left <= 0:
      break
    n = count_tokens(text)
    if n == 0:  # an empty demonstration would spend a block on nothing
      continue
    if n > left:  # cut at the budget; a trailing space only costs tokens
      text, n = _longest_within(text, left, count_tokens, keep_end=False).rstrip(), left
    if text:
      out.append((ref, text))
    left -= n
  return out


# ------------------------------------------------------------------------- truncation


class TeacherPromptTooLongError(ValueError):
  """Raised with truncation='error' when a teacher prompt exceeds max_teacher_prompt_len."""


def _cut(sections: Sequence[Section], keep_chars: int, keep_end: bool) -> list[Section]:
  """Keeps `keep_chars` characters of the concatenated section texts, from the start
  (keep_end=False) or the end (keep_end=True); sections left empty are dropped."""
  order = list(reversed(sections)) if keep_end else list(sections)
  out, left = [], keep_chars
  for s in order:
    if left <= 0:
      break
    take = min(left, len(s.text))
    text = s.text[len(s.text) - take:] if keep_end else s.text[:take]
    out.append(dataclasses.replace(s, text=text))
    left -= take
  return list(reversed(out)) if keep_end else out


def teacher_messages(prompt: Sequence[Message], sections: Sequence[Section],
                      labels: PeerLabels) -> tuple[Message, ...]:
  """The teacher's messages: the prompt with its last user message extended by `sections`
  (the prompt itself when there are none)."""
  if not sections:
    return tuple(prompt)
  *kept, last = prompt
  return (*kept, Message("user", _render_user(last.content, sections, labels)))


def content_tokens(count_tokens: CountTokens) -> CountPromptTokens:
  """A teacher prompt's length without a chat template: `count_tokens` summed over its messages."""
  return lambda messages: sum(count_tokens(m.content) for m in messages)


def _truncate(prompt: Sequence[Message], sections: list[Section], config: PeerConfig,
              count_prompt_tokens: CountPromptTokens, where: str) -> tuple[list[Section], bool, int]:
  """Fits the teacher prompt into max_teacher_prompt_len, as `count_prompt_tokens` measures it.

  Only section texts shrink. 'right' keeps the longest run of section text from the start
  (so feedback, then failure, ... lose their ends first); 'left' keeps the longest run from
  the end (the primary loses its beginning first). The problem text, the closing line and
  the label line of every surviving section stay whole; a section whose text is cut away
  completely is dropped with its label. If even no section fits, none is added (the
  original prompt is returned and the rollout is masked like any empty context).
  """
  def total(secs: Sequence[Section]) -> int:
    return count_prompt_tokens(teacher_messages(prompt, secs, config.labels))

  n = total(sections)
  limit = config.max_teacher_prompt_len
  if not sections or n <= limit:
    return sections, False, n
  if config.truncation == "error":
    raise TeacherPromptTooLongError(
        f"teacher prompt for {where} has {n} tokens > max_teacher_prompt_len={limit} "
        f"(prompt without peers: {total([])} tokens; sections: {[s.kind for s in sections]})")
  keep_end = config.truncation == "left"
  lo, hi = 0, sum(len(s.text) for s in sections)
  while lo < hi:  # largest number of kept characters that fits
    mid = (lo + hi + 1) // 2
    if total(_cut(sections, mid, keep_end)) <= limit:
      lo = mid
    else:
      hi = mid - 1
  kept = _cut(sections, lo, keep_end)
  return kept, True, total(kept)


# -------------------------------------------------------------------------- assembly


def _build_one(groups: Sequence[Group], pos: int, group_index: int, i: int, config: PeerConfig,
               step: int, count_tokens: CountTokens, count_prompt_tokens: CountPromptTokens) -> TeacherContext:
  group = groups[pos]
  rngs = _rollout_rngs(config.seed, step, group_index, i)
  if config.control is None:
    sections, has_primary = _method_sections(groups, pos, i, config, rngs)
  else:
    sections = _control_sections(groups, pos, group_index, i, config, step, rngs, count_tokens)
    has_primary = bool(_successes_for(group, i, config.exclude_self_success))
  verdict = group.verdicts[i]
  feedback = verdict.feedback.strip()
  if (config.include_feedback and not verdict.success and feedback
      and (not config.feedback_only_without_solution or not has_primary)):
    sections.append(Section(FEEDBACK, config.labels.feedback, feedback, ()))

  base = _teacher_base(group.prompt, config)
  sections, truncated, n = _truncate(base, sections, config, count_prompt_tokens,
                                     where=f"group {pos} (index {group_index}), rollout {i}")
  # Nothing added: the teacher sees exactly the student's prompt.
  messages = teacher_messages(base, sections, config.labels) if sections else group.prompt
  mask = 1.0 if sections or config.distill_without_context else 0.0
  return TeacherContext(group=pos, rollout=i, messages=tuple(messages), distill_mask=mask,
                        sections=tuple(sections), truncated=truncated, num_tokens=n)


def build_teacher_contexts(
    groups: Sequence[Group],
    config: PeerConfig = PeerConfig(),
    *,
    step: int = 0,
    group_indices: Sequence[int] | None = None,
    count_tokens: CountTokens = approx_token_count,
    count_prompt_tokens: CountPromptTokens | None = None,
) -> list[list[TeacherContext]]:
  """Teacher contexts for every rollout of every group: result[g][i].

  Batch-level because the `unrelated_prompt` and `success_only_matched` controls draw
  from the other groups given here (this host's groups; a prompt's rollouts are always
  host-local). `group_indices` are the groups' global indices in the step's batch; the
  random draws of rollout i of group g are seeded from (config.seed, step,
  group_indices[g], i), so a group draws the same peers whatever the process count.
  `count_tokens` should be the real tokenizer's count in training (it sizes matched-budget
  controls); `count_prompt_tokens` measures a whole teacher prompt against
  `max_teacher_prompt_len` (in training: the chat-templated token count, so the limit is the
  teacher's bucket; default: `count_tokens` summed over the message contents).
  """
  if count_prompt_tokens is None:
    count_prompt_tokens = content_tokens(count_tokens)
  groups = list(groups)
  if group_indices is None:
    group_indices = range(len(groups))
  group_indices = [int(g) for g in group_indices]
  if len(group_indices) != len(groups):
    raise ValueError(f"group_indices has {len(group_indices)} entries for {len(groups)} groups")
  if len(set(group_indices)) != len(group_indices) or min(group_indices, default=0) < 0:
    raise ValueError(f"group_indices must be distinct non-negative integers, got {group_indices}")
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be a non-negative integer, got {step!r}")
  for g in groups:
    if not isinstance(g, Group):
      raise ValueError(f"build_teacher_contexts expects Group records, got {type(g).__name__}")
  return [[_build_one(groups, pos, gi, i, config, int(step), count_tokens, count_prompt_tokens)
           for i in range(len(g))]
          for pos, (g, gi) in enumerate(zip(groups, group_indices))]


def context_stats(contexts: Sequence[Sequence[TeacherContext]]) -> dict[str, float]:
  """Scalars for logging: masked / truncated fractions, mean sections, kind frequencies."""
  flat = [c for row in contexts for c in row]
  if not flat:
    return {}
  n = float(len(flat))
  stats = {
      "peers/masked_frac": sum(c.distill_mask == 0.0 for c in flat) / n,
      "peers/truncated_frac": sum(c.truncated for c in flat) / n,
      "peers/sections_mean": sum(len(c.sections) for c in flat) / n,
      "peers/teacher_tokens_mean": sum(c.num_tokens for c in flat) / n,
  }
  for kind in (PRIMARY, SUMMARIES, ANOTHER, FAILURE, CONTROL, FEEDBACK):
    stats[f"peers/has_{kind}_frac"] = sum(kind in c.kinds for c in flat) / n
  # 1.0 when no rollout of the step got a context: a distillation step that trains on nothing.
  stats["peers/all_masked_step"] = float(all(c.distill_mask == 0.0 for c in flat))
  return stats


def summary_stats(responses: Sequence[str]) -> dict[str, float]:
  """The fraction of responses with a `<summary>` (summaries variant): 0 starves every context."""
  if not responses:
    return {}
  return {"peers/summary_tag_frac": sum(extract_summary(r) is not None for r in responses) / len(responses)}


def context_warnings(contexts: Sequence[Sequence[TeacherContext]], responses: Sequence[str],
                     config: PeerConfig) -> list[str]:
  """What makes a distillation step silently useless, in words (empty when all is well)."""
  flat = [c for row in contexts for c in row]
  out = []
  if flat and all(c.distill_mask == 0.0 for c in flat):
    out.append(f"all {len(flat)} teacher contexts are empty (no peer, no feedback: distill_mask 0 for every "
               "rollout), so the distillation loss trains on nothing this step; check the peer options "
               "(config.mopd) against the rollouts' successes and feedback")
  if config.use_summaries and responses and not any(extract_summary(r) is not None for r in responses):
    out.append(f"summaries variant: none of the {len(responses)} responses has a <summary>...</summary>, "
               "so no context gets summaries; the student's prompt should carry labels.summary_instruction")
  return out
