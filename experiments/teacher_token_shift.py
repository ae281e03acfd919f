"""Where does the peer-context teacher move probability? Token-level shift on the main job's task.

    python experiments/teacher_token_shift.py                       # 16 prompts x 8, 4 variants
    python experiments/teacher_token_shift.py --prompts 8 --variants mopd_2s1f,mopd_2s1f_no_feedback

Samples G rollouts per training prompt of `configs/default.py` with the initial SmolLM2-135M
(temperature 0.7), verifies them, builds each rollout's teacher context under several peer
configurations, and scores every response token twice with the same initial weights: under the
plain prompt (the student) and under the context (the teacher). Per token, shift = teacher
log-prob - student log-prob: the direction MOPD's distillation pushes the student.

Tokens are split into the final answer's digits (the last run of digit tokens), the end-of-turn
token, and all others; rollouts by whether their context holds a success peer (`primary`) and
whether they succeeded. A useful teacher raises the digits of right answers and lowers those
of wrong ones. Only distilled rollouts (distill mask 1) count.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

# name -> (peer preset, option overrides, label overrides)
VARIANTS = {
    "mopd_2s1f": ("mopd_2s1f", {}, {}),
    "mopd_2s1f_no_feedback": ("mopd_2s1f", {"include_feedback": False}, {}),
    "positive_only": ("positive_only", {}, {}),
    "mopd_2s1f_brief_closing": ("mopd_2s1f", {}, {
        "closing": "Correctly solve the original question. Reply with the final answer only, "
                   "as briefly as the correct solution."}),
    "mopd_2s1f_no_feedback_brief_closing": ("mopd_2s1f", {"include_feedback": False}, {
        "closing": "Correctly solve the original question. Reply with the final answer only, "
                   "as briefly as the correct solution."}),
    "mopd_2s1f_no_feedback_one_line": ("mopd_2s1f", {"include_feedback": False}, {
        "closing": "Correctly solve the original question in one line."}),
}


def answer_positions(token_texts: list[str]) -> list[int]:
  """Positions of the last run of consecutive digit tokens (the final answer)."""
  digits = [i for i, t in enumerate(token_texts) if t.strip().isdigit()]
  if not digits:
    return []
  run = [digits[-1]]
  for p in reversed(digits[:-1]):
    if p != run[-1] - 1:
      break
    run.append(p)
  return run


@dataclasses.dataclass
class RowShift:
  has_success_peer: bool
  success: bool
  answer: list[float]
  end: list[float]
  other: list[float]
  first: float  # the response's first token: where the context can steer how the answer starts


def shifts(teacher_lp, student_lp, token_texts, has_success_peer: bool, success: bool,
           end_text: str) -> RowShift:
  d = np.asarray(teacher_lp) - np.asarray(student_lp)
  ans = set(answer_positions(token_texts))
  end = [i for i, t in enumerate(token_texts) if t == end_text]
  other = [i for i in range(len(d)) if i not in ans and i not in end]
  return RowShift(has_success_peer, success, [float(d[i]) for i in sorted(ans)], [float(d[i]) for i in end],
                  [float(d[i]) for i in other], float(d[0]))


def summarize(rows: list[RowShift]) -> list[str]:
  lines = ["| success peer | rollout | n | answer digits | end of turn | other tokens | first token |",
           "|---|---|---|---|---|---|---|"]
  for peer in (True, False):
    for success in (True, False):
      sel = [r for r in rows if r.has_success_peer == peer and r.success == success]
      if not sel:
        continue
      cell = lambda xs: f"{np.mean(xs):+.3f} ({len(xs)})" if xs else "-"
      lines.append(f"| {'yes' if peer else 'no'} | {'success' if success else 'failure'} | {len(sel)} | "
                   f"{cell([x for r in sel for x in r.answer])} | {cell([x for r in sel for x in r.end])} | "
                   f"{cell([x for r in sel for x in r.other])} | {cell([r.first for r in sel])} |")
  return lines


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--offset", type=int, default=16, help="first training prompt used")
  p.add_argument("--seed", type=int, default=2)
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args()
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")

  from configs import default
  from mopd_jax import peers, rollouts, trainer
  from mopd_jax.analysis.scoring import ScoringParams, score_pairs

  # The variants set their own closing; the recorded run (experiments/README.md) sampled with
  # the 96-token prompt bucket of the main job of that day.
  c = default.get_config("closing=spec")
  c.data.prompt_buckets = (96,)
  c.checkpoint.dir = ""
  c.logging.dir = ""
  c.logging.progress = False
  run = trainer.setup(c)
  g = args.group
  examples = run.train_examples[args.offset:args.offset + args.prompts]
  groups = rollouts.sample_and_verify(run, examples, jax.random.key(args.seed), group_size=g,
                                      temperature=c.sampling.temperature, max_new_tokens=c.sampling.max_new_tokens)
  responses = [r for group in groups for r in group.response_tokens]
  successes = [s for group in groups for s in group.successes]
  n = len(responses)
  model = (run.student_graphdef, run.state.params)
  params = ScoringParams(temperature=c.sampling.temperature, chunk_size=64, pad_id=run.tokenizer.pad_id)
  student = score_pairs(model, [(group.prompt_tokens, r) for group in groups for r in group.response_tokens],
                        params=params)
  texts = [[run.tokenizer.decode([t]) for t in resp] for resp in responses]
  end_text = run.tokenizer.decode([run.tokenizer.eos_ids[0]])
  success = np.array([group.successes for group in groups])
  print(f"{args.prompts} prompts x {g} rollouts, temperature {c.sampling.temperature}: success rate "
        f"{success.mean():.3f}, groups with both outcomes {np.mean(success.any(1) & ~success.all(1)):.3f}")
  print("cells: mean shift (teacher - student log-prob, nats) over tokens (token count)")
  for name in args.variants.split(","):
    preset, options, labels = VARIANTS[name]
    config = peers.get_preset(preset, seed=c.seed, **{**dict(c.mopd.overrides), "include_feedback": True, **options})
    if labels:
      config = dataclasses.replace(config, labels=dataclasses.replace(config.labels, **labels))
    with_contexts = rollouts.with_teacher_contexts(groups, config, run.tokenizer,
                                                   enable_thinking=c.sampling.enable_thinking)
    flat = [ctx for group in with_contexts for ctx in group.contexts]
    teacher_prompts = [p for group in with_contexts for p in group.teacher_prompt_tokens]
    teacher = score_pairs(model, [(teacher_prompts[r], responses[r]) for r in range(n)], params=params)
    rows = [shifts(teacher.token_logprobs[r], student.token_logprobs[r], texts[r], "primary" in flat[r].kinds,
                   bool(successes[r]), end_text)
            for r in range(n) if flat[r].distill_mask > 0]
    print(f"\n{name} ({preset}, {options or 'preset options'}{', labels ' + str(list(labels)) if labels else ''}): "
          f"{len(rows)}/{n} rollouts distilled")
    print("\n".join(summarize(rows)))


if __name__ == "__main__":
  main()
