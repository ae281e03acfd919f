"""The main job: MOPD on the real SmolLM2-135M-Instruct, seeded reasoning-gym arithmetic.

    python -m mopd_jax.main                                   # this config
    python -m mopd_jax.main --config=configs/default.py:method=grpo
    python -m mopd_jax.main --config=configs/default.py:closing=spec  # the spec's teacher closing
    python -m mopd_jax.main --config.optim.lr=3e-6 --config.train.steps=20

Sized for 2 CPU cores in under 15 minutes (about 13 on a quiet 2-core VM); the `tiny` argument
shrinks it to a random tiny model for smoke tests. `closing=spec` restores the spec's closing line
in the teacher's context.
"""

from mopd_jax import config_lib


# The teacher's closing instruction (a spec label; "spec" keeps the spec's reference text). Under
# the spec's closing this 135M teacher lowers the end-of-turn token by ~1 nat, so distillation
# lengthens answers and training success falls below the initial model's (0.15-0.22 vs 0.25);
# "one_line" removes that bias and training success rises (0.33-0.47). experiments/README.md,
# "Where the peer-context teacher pushes SmolLM2-135M" and "Main-job ablations 2".
CLOSINGS = {"spec": "", "one_line": "Correctly solve the original question in one line."}


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, size="default", method="mopd", closing="one_line")
  c = config_lib.base_config()
  config_lib.apply_method(c, a.method)
  c.model.preset = "smollm2-135m"
  c.model.checkpoint = "smollm2-gguf"
  c.data.task = "reasoning_gym"
  c.data.options = {"dataset": "basic_arithmetic", "verifier": "math",
                    "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                               "operators": ("+",), "allow_negation": False,
                               "allow_parentheses": False}}
  c.data.train_size = 2000
  c.data.eval_size = 200
  # One bucket each: every step reuses one compiled sampler and one compiled train step.
  c.data.prompts_per_step = 4
  c.data.prompt_buckets = (64,)  # the chat-formatted prompts are 49-51 tokens
  c.data.response_buckets = (64,)
  c.data.teacher_prompt_buckets = (256,)
  c.mopd.overrides = {"max_teacher_prompt_len": 256, "truncation": "right"}  # the teacher bucket: it bounds the templated prompt
  if a.method == "mopd":
    # The math verifier's feedback repeats the wrong answer ("final answer 189 is incorrect"),
    # and this 135M self-teacher copies it: under feedback-only contexts it raised the wrong
    # answer's digits by +0.26 nats on average, under the failure peer alone it lowered them
    # by -0.63 (experiments/README.md, "Where the peer-context teacher pushes SmolLM2-135M").
    c.mopd.overrides["include_feedback"] = False
  if a.closing not in CLOSINGS:
    raise ValueError(f"config argument closing={a.closing!r}: known {sorted(CLOSINGS)}")
  if CLOSINGS[a.closing]:
    c.mopd.overrides["labels"] = {"closing": CLOSINGS[a.closing]}
  c.sampling.group_size = 4
  c.sampling.max_new_tokens = 64
  # SmolLM2-135M rambles at temperature 1 (the paper's value for 4B-14B models); 0.7 keeps
  # its rollouts on topic. The teacher scores at the same temperature.
  c.sampling.temperature = 0.7
  c.loss.chunk_size = 64
  c.optim.lr = 3e-5
  c.train.steps = 16
  c.eval.num_samples = 1
  c.eval.temperature = 0.7
  c.eval.max_new_tokens = 64
  c.eval.batch_prompts = 100
  c.checkpoint.dir = "runs/default/checkpoints"
  c.checkpoint.every = 8
  c.logging.dir = "runs/default"
  c.mesh.data = 1
  if a.size == "tiny":
    shrink_to_tiny(c)
  return c


def shrink_to_tiny(c):
  """A random tiny llama with SmolLM2's tokenizer: a < 2 minute CPU smoke run."""
  c.model.preset = "tiny-llama"
  c.model.checkpoint = ""
  c.data.train_size = 64
  c.data.eval_size = 8
  c.data.prompts_per_step = 2
  c.sampling.max_new_tokens = 16
  c.data.response_buckets = (16,)
  c.eval.max_new_tokens = 16
  c.eval.num_samples = 2
  c.eval.batch_prompts = 8
  c.train.steps = 3
  c.optim.lr = 1e-3
  c.checkpoint.dir = ""
  c.logging.dir = ""
  c.logging.progress = False
