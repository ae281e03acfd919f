"""Tests of peer selection and teacher-context construction (spec section 2)."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from mopd_jax import peers
from mopd_jax.peers import (ANOTHER, CONTROL, FAILURE, FEEDBACK, PRIMARY, SUMMARIES, Group,
                            PeerConfig, PeerLabels, PeerRef, build_teacher_contexts, get_preset)
from mopd_jax.types import Message, Verdict

SYSTEM = Message("system", "You are a careful solver.")


def prompt(text: str = "What is 2+2?") -> tuple[Message, ...]:
  return (SYSTEM, Message("user", text))


def ok() -> Verdict:
  return Verdict(reward=1.0, success=True)


def bad(feedback: str = "") -> Verdict:
  return Verdict(reward=0.0, success=False, feedback=feedback)


def make_group(pattern: str, text: str = "What is 2+2?", tag: str = "r",
               feedback: str = "") -> Group:
  """pattern: one char per rollout, 's' success / 'f' failure; response j is '<tag>j answer'."""
  responses = tuple(f"{tag}{j} answer" for j in range(len(pattern)))
  verdicts = tuple(ok() if c == "s" else bad(feedback) for c in pattern)
  return Group(prompt(text), responses, verdicts)


MIXED = make_group("fsfssf")  # S = {1, 3, 4}, F = {0, 2, 5}
ALL_SUCCEED = make_group("ssss")
NONE_SUCCEED = make_group("ffff", feedback="Expected 4.")
ONLY_SELF = make_group("fsff", feedback="Wrong.")  # the only success is rollout 1
SHAPES = {"mixed": MIXED, "all": ALL_SUCCEED, "none": NONE_SUCCEED, "only_self": ONLY_SELF}


def contexts(group: Group, config: PeerConfig = PeerConfig(), **kw) -> list[peers.TeacherContext]:
  return build_teacher_contexts([group], config, **kw)[0]


def user_text(ctx: peers.TeacherContext) -> str:
  return ctx.messages[-1].content


# ------------------------------------------------------------------- config, presets


def test_defaults_match_spec():
  c = PeerConfig()
  assert (c.exclude_self_success, c.include_primary, c.include_another, c.include_failure) == (True,) * 4
  assert c.failure_condition == "always"
  assert c.include_feedback and c.feedback_only_without_solution and not c.strip_thinking
  assert c.max_teacher_prompt_len == 10240 and c.truncation == "right"
  assert c.control is None and c.control_match == "block" and not c.use_summaries
  assert c.labels.primary == "Correct solution:"
  assert c.labels.another == "Another successful solution:"
  assert c.labels.failure == "A known failed solution (avoid repeating this mistake):"
  assert c.labels.feedback == "The following is feedback from your unsuccessful earlier attempt:"
  assert c.labels.closing == "Correctly solve the original question."


def test_presets_registry():
  assert set(peers.PEER_PRESETS) >= {"mopd_2s1f", "positive_only", "sdpo", "plain_opd", "random_peer",
                                     "unrelated_prompt", "success_only_matched"}
  assert get_preset("mopd_2s1f") == PeerConfig()
  assert get_preset("random_peer", control_match="token").control_match == "token"
  with pytest.raises(ValueError, match="unknown peer preset 'nope'"):
    get_preset("nope")
  with pytest.raises(ValueError, match="already registered"):
    peers.register_preset("sdpo")(lambda: PeerConfig())


@pytest.mark.parametrize("field,value", [
    ("failure_condition", "sometimes"), ("truncation", "middle"), ("control", "other"),
    ("control_match", "chars"), ("summaries_from", "best"), ("max_teacher_prompt_len", 0),
    ("summaries_k", 0), ("seed", -1), ("include_primary", 1), ("strip_thinking", "yes"),
    ("labels", {"primary": "x"}),
])
def test_invalid_options_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"PeerConfig.{field}"):
    PeerConfig(**{field: value})


def test_invalid_combinations_and_labels():
  with pytest.raises(ValueError, match="PeerConfig.use_summaries"):
    PeerConfig(control="random_peer", use_summaries=True)
  with pytest.raises(ValueError, match="PeerLabels.summary_item"):
    PeerLabels(summary_item="- no placeholder")


def test_from_mapping_preset_labels_and_unknown_keys():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"preset": "sdpo", "seed": 3, "labels": {"primary": "Solution:"}})
  c = PeerConfig.from_mapping(cfg)
  assert not c.include_another and c.seed == 3 and c.labels.primary == "Solution:"
  assert c.labels.closing == PeerLabels().closing
  with pytest.raises(ValueError, match="unknown option 'typo'"):
    PeerConfig.from_mapping({"typo": 1})
  with pytest.raises(ValueError, match="unknown label 'nope'"):
    PeerConfig.from_mapping({"labels": {"nope": "x"}})


def test_group_validation():
  with pytest.raises(ValueError, match="verdicts"):
    Group(prompt(), ("a", "b"), (ok(),))
  with pytest.raises(ValueError, match="end with a user message"):
    Group((SYSTEM,), ("a",), (ok(),))
  g = Group(list(prompt()), ["a"], [ok()])  # lists are accepted and frozen into tuples
  assert isinstance(g.responses, tuple)


# ------------------------------------------------------------------- 2S1F selection


def test_mopd_mixed_group_peers_in_order():
  ctx = contexts(MIXED)
  c0 = ctx[0]  # a failure
  assert c0.kinds == (PRIMARY, ANOTHER, FAILURE)
  assert c0.peer_index(PRIMARY) == 1 and c0.peer_index(ANOTHER) == 3
  assert c0.peer_index(FAILURE) in (2, 5)
  c1 = ctx[1]  # a success: itself excluded, so the next two successes
  assert (c1.peer_index(PRIMARY), c1.peer_index(ANOTHER)) == (3, 4)
  assert c1.peer_index(FAILURE) in (0, 2, 5)
  text = user_text(c0)
  positions = [text.index(s) for s in ("What is 2+2?", "Correct solution:\nr1 answer",
                                       "Another successful solution:\nr3 answer",
                                       "A known failed solution", "Correctly solve")]
  assert positions == sorted(positions)
  assert c0.messages[0] == SYSTEM and len(c0.messages) == 2


def test_all_succeed_has_no_failure():
  for i, c in enumerate(contexts(ALL_SUCCEED)):
    others = [j for j in range(4) if j != i]
    assert c.kinds == (PRIMARY, ANOTHER)
    assert (c.peer_index(PRIMARY), c.peer_index(ANOTHER)) == tuple(others[:2])


def test_none_succeed_failure_and_feedback():
  for i, c in enumerate(contexts(NONE_SUCCEED)):
    assert c.kinds == (FAILURE, FEEDBACK)
    assert c.peer_index(FAILURE) != i
    assert c.section(FEEDBACK).text == "Expected 4."
    assert c.distill_mask == 1.0


def test_only_success_is_self():
  c = contexts(ONLY_SELF)[1]
  assert c.kinds == (FAILURE,)  # no primary, and a success gets no feedback
  assert contexts(ONLY_SELF)[0].peer_index(PRIMARY) == 1


def test_exclude_self_success_false_uses_own_response_as_primary():
  c = contexts(MIXED, PeerConfig(exclude_self_success=False))[1]
  assert (c.peer_index(PRIMARY), c.peer_index(ANOTHER)) == (1, 3)
  c = contexts(ONLY_SELF, PeerConfig(exclude_self_success=False))[1]
  assert c.peer_index(PRIMARY) == 1


@pytest.mark.parametrize("preset", sorted(peers.PEER_PRESETS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_own_response_never_appears(preset, shape):
  group = SHAPES[shape]
  other = make_group("sfs", text="Another problem", tag="u")
  for c in build_teacher_contexts([group, other], get_preset(preset))[0]:
    assert PeerRef(0, c.rollout) not in c.peers
    assert group.responses[c.rollout] not in user_text(c)


def test_include_flags():
  c = contexts(MIXED, PeerConfig(include_primary=False))[0]
  assert c.kinds == (ANOTHER, FAILURE) and c.peer_index(ANOTHER) == 3  # another = S[1] still
  assert contexts(MIXED, PeerConfig(include_another=False))[0].kinds == (PRIMARY, FAILURE)
  assert contexts(MIXED, PeerConfig(include_failure=False))[0].kinds == (PRIMARY, ANOTHER)
  assert contexts(MIXED, get_preset("positive_only"))[0].kinds == (PRIMARY, ANOTHER)


def test_failure_condition_when_no_solution():
  config = PeerConfig(failure_condition="when_no_solution")
  assert FAILURE not in contexts(MIXED, config)[0].kinds
  assert contexts(NONE_SUCCEED, config)[0].kinds == (FAILURE, FEEDBACK)
  assert contexts(ONLY_SELF, config)[1].kinds == (FAILURE,)  # primary excluded -> none exists


def test_failure_peer_is_uniform_over_f_minus_i():
  counts = collections.Counter(contexts(MIXED, PeerConfig(seed=s))[0].peer_index(FAILURE)
                               for s in range(400))
  assert set(counts) == {2, 5}
  assert 150 < counts[2] < 250


def test_feedback_rules():
  group = make_group("fsf", feedback="Test 3 failed.")
  assert FEEDBACK not in contexts(group)[0].kinds  # a primary exists
  c = contexts(group, PeerConfig(feedback_only_without_solution=False))
  assert c[0].kinds[-1] == FEEDBACK and c[0].section(FEEDBACK).text == "Test 3 failed."
  assert FEEDBACK not in c[1].kinds  # successes never get feedback
  assert FEEDBACK not in contexts(NONE_SUCCEED, PeerConfig(include_feedback=False))[0].kinds
  assert FEEDBACK not in contexts(make_group("ff"))[0].kinds  # empty feedback adds nothing


def test_sdpo_preset():
  assert contexts(MIXED, get_preset("sdpo"))[0].kinds == (PRIMARY,)
  assert contexts(NONE_SUCCEED, get_preset("sdpo"))[0].kinds == (FEEDBACK,)
  assert contexts(make_group("ff"), get_preset("sdpo"))[0].distill_mask == 0.0


def test_plain_opd_preset_keeps_prompt_and_distils():
  for shape, group in SHAPES.items():
    for c in contexts(group, get_preset("plain_opd")):
      assert c.messages == group.prompt and c.sections == () and c.distill_mask == 1.0, shape


# ---------------------------------------------------------------- thinking, summaries


def test_strip_thinking_function():
  assert peers.strip_thinking("<think>hmm</think>\nAnswer: 4") == "Answer: 4"
  assert peers.strip_thinking("a <think>x</think> b <think>y</think> c") == "a  b  c"
  assert peers.strip_thinking("reasoning</think>final") == "final"  # opener was in the prompt
  assert peers.strip_thinking("Answer <think>cut off") == "Answer"  # unclosed: drop the rest


def test_strip_thinking_option():
  group = Group(prompt(), ("<think>secret</think>x=4", "<think>plan</think>\ny=4"), (bad(), ok()))
  assert contexts(group)[0].section(PRIMARY).text == "<think>plan</think>\ny=4"
  assert contexts(group, PeerConfig(strip_thinking=True))[0].section(PRIMARY).text == "y=4"


def summary_group() -> Group:
  responses = ("s0 <summary>add</summary>", "s1 <summary>count</summary>",
               "f2 <summary>guess</summary>", "s3 no summary", "f4 <summary>subtract</summary>",
               "f5 <summary>multiply</summary>")
  return Group(prompt(), responses, (ok(), ok(), bad(), ok(), bad(), bad()))


def test_extract_summary():
  assert peers.extract_summary("x <summary>a</summary> y <summary> b </summary>") == "b"
  assert peers.extract_summary("<think><summary>no</summary></think>x") is None
  assert peers.extract_summary("no tag") is None


@pytest.mark.parametrize("source,label,pool", [
    ("successes", "Summaries of successful solutions:", {1}),  # self (0) excluded, 3 has none
    ("failures", "Summaries of failed solutions (avoid these approaches):", {2, 4, 5}),
    ("all", "Summaries of other attempts:", {1, 2, 4, 5}),
])
def test_summaries(source, label, pool):
  config = PeerConfig(use_summaries=True, summaries_k=2, summaries_from=source, summaries_replace_solutions=True)
  c = contexts(summary_group(), config)[0]
  assert c.kinds == (SUMMARIES,)  # summaries replace full solutions (an option; not the default)
  s = c.section(SUMMARIES)
  idx = [p.index for p in s.peers]
  assert s.label == label and set(idx) <= pool and len(idx) == min(2, len(pool))
  assert idx == sorted(idx)
  for line, j in zip(s.text.split("\n"), idx):
    summary = peers.extract_summary(summary_group().responses[j])
    if source == "all":
      tag = "(successful)" if j == 1 else "(failed)"
      assert line == f"- {tag} {summary}"
    else:
      assert line == f"- {summary}"


def test_summaries_alongside_solutions_in_layout_order():
  config = PeerConfig(use_summaries=True, summaries_replace_solutions=False, summaries_k=1)
  c = contexts(summary_group(), config)[2]
  assert c.kinds == (PRIMARY, SUMMARIES, ANOTHER, FAILURE)
  # The primary is shown in full, so it is not summarised again: 1 is the only other success with a summary.
  assert c.peer_index(PRIMARY) == 0 and [p.index for p in c.section(SUMMARIES).peers] == [1]


def test_summaries_defaults_follow_the_authors():
  c = PeerConfig()
  assert c.summaries_from == "successes" and not c.summaries_replace_solutions
  assert c.summary_instruction_to_teacher
  assert c.labels.summary_instruction == (
      "After your answer, briefly summarize your key approach in one sentence inside <summary> tags, "
      "e.g. <summary>...</summary>.")
  preset = get_preset("summaries")
  assert preset.use_summaries and preset.include_primary
  assert not (preset.include_another or preset.include_failure)


def tagged_group(pattern: str) -> Group:
  """Every response ends with a summary, as the summary instruction asks."""
  responses = tuple(f"r{j} answer <summary>idea {j}</summary>" for j in range(len(pattern)))
  return Group(prompt(), responses, tuple(ok() if ch == "s" else bad("Wrong.") for ch in pattern))


def test_summaries_variant_keeps_the_primary_and_summarises_the_other_successes():
  group = tagged_group("sfsss")  # S = {0, 2, 3, 4}
  for c in contexts(group, get_preset("summaries", summaries_k=8)):
    others = [j for j in group.successes if j != c.rollout]
    primary, rest = others[0], others[1:]
    assert c.distill_mask == 1.0 and c.kinds == (PRIMARY, SUMMARIES)
    assert c.peer_index(PRIMARY) == primary
    assert [p.index for p in c.section(SUMMARIES).peers] == rest  # never self, never the primary
    assert user_text(c) == "\n\n".join([
        "What is 2+2?", f"Correct solution:\nr{primary} answer <summary>idea {primary}</summary>",
        "Summaries of successful solutions:\n" + "\n".join(f"- idea {j}" for j in rest),
        "Correctly solve the original question."])


def test_summaries_k_bounds_the_summaries():
  for c in contexts(tagged_group("sssss"), get_preset("summaries", summaries_k=2)):
    idx = [p.index for p in c.section(SUMMARIES).peers]
    assert len(idx) == 2 and c.rollout not in idx and c.peer_index(PRIMARY) not in idx


def test_student_prompt_carries_the_summary_instruction_only_with_summaries():
  instruction = PeerLabels().summary_instruction
  assert peers.student_prompt(prompt(), PeerConfig()) == prompt()
  instructed = peers.student_prompt(prompt(), get_preset("summaries"))
  assert instructed == (SYSTEM, Message("user", "What is 2+2?\n\n" + instruction))
  quiet = get_preset("summaries", labels={"summary_instruction": ""})  # the task's prompt already asks
  assert peers.student_prompt(prompt(), quiet) == prompt()


@pytest.mark.parametrize("to_teacher", [True, False])
def test_teacher_reads_the_problem_with_or_without_the_summary_instruction(to_teacher):
  config = get_preset("summaries", summary_instruction_to_teacher=to_teacher)
  student = peers.student_prompt(prompt(), config)
  group = Group(student, tagged_group("fss").responses, tagged_group("fss").verdicts)
  c = contexts(group, config)[0]
  problem = student[-1].content if to_teacher else "What is 2+2?"
  assert user_text(c).startswith(problem + "\n\nCorrect solution:\nr1 answer")
  assert c.messages[0] == SYSTEM


def test_all_empty_contexts_are_flagged():
  # The summaries-only reading with responses that carry no summary: nothing to add anywhere.
  config = PeerConfig(use_summaries=True, summaries_replace_solutions=True, include_feedback=False)
  out = build_teacher_contexts([make_group("sfsf"), make_group("ssf", text="x")], config)
  assert all(c.distill_mask == 0.0 for row in out for c in row)
  assert peers.context_stats(out)["peers/all_masked_step"] == 1.0
  warnings = peers.context_warnings(out, ["r0 answer"] * 7, config)
  assert any("all 7 teacher contexts" in w for w in warnings)
  assert any("none of the 7 responses" in w and "<summary>" in w for w in warnings)
  assert peers.context_stats(build_teacher_contexts([MIXED]))["peers/all_masked_step"] == 0.0
  assert peers.context_warnings(build_teacher_contexts([MIXED]), MIXED.responses, PeerConfig()) == []


# ------------------------------------------------------------------------ controls


BATCH = [MIXED, make_group("sfsf", text="Other A", tag="a"), make_group("ffs", text="Other B", tag="b"),
         make_group("fsfssf", tag="dup")]  # the last repeats MIXED's prompt: not "unrelated"


@pytest.mark.parametrize("control", peers.CONTROLS)
def test_controls_keep_block_budget(control):
  out = build_teacher_contexts(BATCH, get_preset(control))
  for pos, group in enumerate(BATCH):
    ref = build_teacher_contexts(BATCH, get_preset("mopd_2s1f"))[pos]
    for i, c in enumerate(out[pos]):
      blocks = [s for s in c.sections if s.kind == CONTROL]
      expected = sum(k != FEEDBACK for k in ref[i].kinds)
      assert len(blocks) == expected, (control, pos, i)
      assert all(s.label == "Example solution:" for s in blocks)
      assert len(set(c.peers)) == len(c.peers)


def test_random_peer_draws_from_own_group_minus_self():
  seen = set()
  for seed in range(30):
    for c in build_teacher_contexts(BATCH, get_preset("random_peer", seed=seed))[0]:
      for p in c.peers:
        assert p.group == 0 and p.index != c.rollout
        seen.add(p.index)
  assert seen == set(range(6))  # failures and successes alike


def test_unrelated_prompt_draws_successes_of_other_prompts():
  for seed in range(20):
    for c in build_teacher_contexts(BATCH, get_preset("unrelated_prompt", seed=seed))[0]:
      for p in c.peers:
        assert p.group in (1, 2) and BATCH[p.group].verdicts[p.index].success


def test_success_only_matched_same_prompt_first_then_top_up():
  out = build_teacher_contexts(BATCH, get_preset("success_only_matched"))
  c = out[0][0]  # 3 same-prompt successes, 3 blocks
  assert [p.index for p in c.peers] == [1, 3, 4] and all(p.group == 0 for p in c.peers)
  c = out[2][0]  # group "ffs": 2S1F has primary + failure = 2 blocks, only 1 success
  assert c.peers[0] == PeerRef(2, 2)
  top_up = c.peers[1]
  assert top_up.group in (0, 1, 3) and BATCH[top_up.group].verdicts[top_up.index].success


@pytest.mark.parametrize("control", peers.CONTROLS)
def test_controls_keep_token_budget(control):
  long_batch = [
      Group(prompt(), ("one two three", "alpha beta gamma delta epsilon", "x y", "p q r s t u v w"),
            (bad(), ok(), bad(), ok())),
      Group(prompt("B"), tuple(" ".join(["w"] * n) for n in (7, 3, 9)), (ok(), ok(), ok())),
  ]
  words = lambda s: len(s.split())
  config = get_preset(control, control_match="token")
  out = build_teacher_contexts(long_batch, config, count_tokens=words)
  for i, c in enumerate(out[0]):
    _, budget = peers.control_budget(long_batch[0], i, config, count_tokens=words)
    used = sum(words(s.text) for s in c.sections if s.kind == CONTROL)
    assert used == budget, (control, i)


def test_control_token_budget_uses_the_2s1f_failure():
  group = Group(prompt(), ("a", "b b", "c c c c", "d d d d d d d d", "e"), (ok(), ok(), bad(), bad(), bad()))
  words = lambda s: len(s.split())
  for seed in range(10):
    ref = contexts(group, PeerConfig(seed=seed))[4]
    _, budget = peers.control_budget(group, 4, PeerConfig(seed=seed), count_tokens=words)
    assert budget == sum(words(s.text) for s in ref.sections)


# ----------------------------------------------------------------------- truncation


LONG = Group(prompt("Problem P."),
             ("bad " * 5, " ".join(f"p{k}" for k in range(40)), " ".join(f"a{k}" for k in range(40)),
              " ".join(f"f{k}" for k in range(40))),
             (bad(), ok(), ok(), bad()))


def words(s: str) -> int:
  return len(s.split())


def test_truncation_right_keeps_start_of_peer_sections():
  config = PeerConfig(max_teacher_prompt_len=70, truncation="right")
  c = contexts(LONG, config, count_tokens=words)[0]
  assert c.truncated and c.num_tokens <= 70
  assert c.kinds == (PRIMARY, ANOTHER)  # the failure (last) was cut away entirely
  assert c.section(PRIMARY).text == LONG.responses[1]
  assert LONG.responses[2].startswith(c.section(ANOTHER).text)
  text = user_text(c)
  assert text.startswith("Problem P.\n\nCorrect solution:\n")
  assert text.endswith("\n\nCorrectly solve the original question.")
  assert c.distill_mask == 1.0


def test_truncation_left_keeps_end_of_peer_sections():
  config = PeerConfig(max_teacher_prompt_len=70, truncation="left")
  c = contexts(LONG, config, count_tokens=words)[0]
  assert c.truncated and c.num_tokens <= 70
  assert c.kinds == (ANOTHER, FAILURE)
  assert c.section(FAILURE).text == LONG.responses[3]
  assert LONG.responses[2].endswith(c.section(ANOTHER).text)
  assert user_text(c).startswith("Problem P.\n\nAnother successful solution:\n")  # label kept whole


def test_truncation_error_names_rollout_and_lengths():
  match = r"rollout 0 has \d+ tokens > max_teacher_prompt_len=70"
  with pytest.raises(peers.TeacherPromptTooLongError, match=match):
    contexts(LONG, PeerConfig(max_teacher_prompt_len=70, truncation="error"), count_tokens=words)


def test_no_truncation_when_it_fits():
  c = contexts(LONG, count_tokens=words)[0]
  assert not c.truncated and c.num_tokens == sum(words(m.content) for m in c.messages)


def test_truncation_that_leaves_nothing_masks_the_rollout():
  c = contexts(LONG, PeerConfig(max_teacher_prompt_len=8), count_tokens=words)[0]
  assert c.truncated and c.sections == () and c.messages == LONG.prompt and c.distill_mask == 0.0


# -------------------------------------------------------------------- mask, determinism


@pytest.mark.parametrize("preset", sorted(set(peers.PEER_PRESETS) - {"plain_opd"}))
def test_mask_zero_exactly_when_nothing_added(preset):
  batch = list(SHAPES.values()) + [make_group("f", text="single"), make_group("s", text="lone")]
  for row in build_teacher_contexts(batch, get_preset(preset)):
    for c in row:
      assert c.distill_mask == (1.0 if c.sections else 0.0)
      if not c.sections:
        assert c.messages == batch[c.group].prompt
  single = build_teacher_contexts(batch, get_preset(preset))[-1][0]
  assert single.distill_mask == 0.0  # a lone success has no peer and no feedback


@pytest.mark.parametrize("preset", sorted(peers.PEER_PRESETS))
def test_deterministic_for_a_seed(preset):
  a = build_teacher_contexts(BATCH, get_preset(preset, seed=7), step=3)
  b = build_teacher_contexts(BATCH, get_preset(preset, seed=7), step=3)
  assert a == b


def test_seed_and_step_change_draws():
  base = [c.peer_index(FAILURE) for c in contexts(MIXED, PeerConfig(seed=0))]
  failures = lambda **kw: [c.peer_index(FAILURE) for c in contexts(MIXED, **kw)]
  assert any(failures(config=PeerConfig(seed=s)) != base for s in range(1, 10))
  assert any(failures(step=s) != base for s in range(1, 10))


def test_draws_depend_on_global_group_index_not_batch_layout():
  # A process holding only group 2 of the batch draws what the single process does.
  whole = build_teacher_contexts([ALL_SUCCEED, NONE_SUCCEED, MIXED], PeerConfig(seed=1))
  shard = build_teacher_contexts([MIXED], PeerConfig(seed=1), group_indices=[2])
  as_indices = lambda row: [(c.kinds, [p.index for p in c.peers]) for c in row]
  assert as_indices(whole[2]) == as_indices(shard[0])
  # ... and the global index does enter the seed.
  assert any(as_indices(build_teacher_contexts([MIXED], PeerConfig(seed=s), group_indices=[2])[0])
             != as_indices(build_teacher_contexts([MIXED], PeerConfig(seed=s))[0]) for s in range(10))
  with pytest.raises(ValueError, match="group_indices"):
    build_teacher_contexts([MIXED], group_indices=[0, 1])


def test_context_stats():
  stats = peers.context_stats(build_teacher_contexts([MIXED, make_group("s", text="x")]))
  assert stats["peers/masked_frac"] == pytest.approx(1 / 7)
  assert stats["peers/has_primary_frac"] == pytest.approx(6 / 7)


# --------------------------------------------------------------------------- golden


GOLDEN = """\
Compute 17 * 3.

Correct solution:
17 * 3 = 51. Answer: 51

Another successful solution:
17 * 3 = 17 + 17 + 17 = 51.

A known failed solution (avoid repeating this mistake):
17 * 3 = 41.

The following is feedback from your unsuccessful earlier attempt:
Expected 51, got 52.

Correctly solve the original question."""


def test_golden_teacher_message():
  group = Group(
      (Message("system", "Think step by step."), Message("user", "Compute 17 * 3.")),
      ("17 * 3 = 52.", "<think>17*3</think>\n17 * 3 = 51. Answer: 51", "17 * 3 = 17 + 17 + 17 = 51.",
       "17 * 3 = 41."),
      (bad("Expected 51, got 52."), ok(), ok(), bad("off by ten")))
  config = PeerConfig(strip_thinking=True, feedback_only_without_solution=False)
  c = contexts(group, config)[0]
  assert c.messages == (Message("system", "Think step by step."), Message("user", GOLDEN))
  assert c.kinds == (PRIMARY, ANOTHER, FAILURE, FEEDBACK)
  assert [p.index for p in c.peers] == [1, 2, 3] and c.distill_mask == 1.0 and not c.truncated


def test_custom_labels_render():
  labels = dataclasses.replace(PeerLabels(), primary="Reference:", closing="Now solve it.",
                               separator="\n---\n")
  c = contexts(make_group("fs"), PeerConfig(labels=labels))[0]
  assert user_text(c) == "What is 2+2?\n---\nReference:\nr1 answer\n---\nNow solve it."
