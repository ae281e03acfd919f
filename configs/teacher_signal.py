"""Teacher-signal analysis (spec section 6): `python -m mopd_jax.analysis.teacher_signal`.

    python -m mopd_jax.analysis.teacher_signal --config=configs/teacher_signal.py
    python -m mopd_jax.analysis.teacher_signal --config=configs/teacher_signal.py:tiny   # < 2 min smoke run
    python -m mopd_jax.analysis.teacher_signal --config.analysis.rollouts_in=<dump>.jsonl

Default: SmolLM2-135M-Instruct (GGUF) as student and self-teacher, 48 seeded 2-number
additions (reasoning-gym basic_arithmetic, 1-2 digit terms, "+" only), 8 rollouts each at
temperature 0.7 (teacher too), 64 new tokens. At temperature 1.0 (and with subtraction, the
main job's task) most prompts get no success at all (measured: 58% of 48 prompts with +/-;
48% with + only at T=1.0; 31% at T=0.7), and the metrics over prompts with both outcomes
need mixed groups. The model, task, prompt format, sampler and verifier
fields are the training config's (configs/default.py); `analysis` holds the rest.
"""

import ml_collections

from configs import default
from mopd_jax import config_lib


def analysis_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_prompts=48,  # first prompts of the task's training split (0 = all)
      rollouts_in="",  # a rollout dump (rollouts.RolloutGroup JSONL) instead of sampling
      out_dir="experiments/results/teacher_signal_smollm2",
      # mopd_jax.analysis.teacher_signal.VARIANTS names (+ top<N>_reward)
      variants=("base", "solution", "another_solution", "failure", "solution+failure", "2s1f",
                "all_solutions", "random_peer", "top3_reward"),
      teacher_checkpoint="",  # "" = the student itself; else .gguf / HF dir / orbax (same tokenizer)
      temperature=0.0,  # teacher temperature; <= 0 = sampling.temperature (spec: the same)
      max_teacher_prompt_len=2048,
      context_buckets=(128, 192, 256, 384, 512, 768, 1024, 2048),
      response_buckets=(32, 64, 128, 256, 512),
      context_batch=32,  # large: a context batch's last partial response batch is padded
      response_batch=16,
      chunk_size=128,
      sample_batch_prompts=8,
      n_resamples=1000,
      bootstrap_seed=0,
      plots=True,
      progress=True,
  ))


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, size="default")
  c = default.get_config("tiny" if a.size == "tiny" else None)
  c.analysis = analysis_section()
  c.data.prompt_buckets = (96,)  # the recorded run's sampler padding (experiments/README.md)
  c.sampling.group_size = 8
  c.sampling.temperature = 0.7
  c.data.options.config.operators = ("+",)
  c.sampling.max_new_tokens = 64
  c.data.train_size = c.analysis.num_prompts
  c.data.eval_size = 1  # unused; keeps the held-out split (built alongside) cheap
  if a.size == "tiny":
    c.analysis.num_prompts = 3
    c.data.train_size = 3
    c.sampling.group_size = 4
    c.sampling.max_new_tokens = 16
    c.analysis.out_dir = ""
    c.analysis.n_resamples = 100
    c.analysis.context_buckets = (128, 256, 512)
    c.analysis.response_buckets = (16,)
    c.analysis.progress = False
  return c
