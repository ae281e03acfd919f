"""Shared settings of the paper-scale runs (MOPD_SPEC.md section 7), for TPU/GPU with local data.

Each paper config is `paper_config(...)` plus its task. Data and checkpoints are local files,
given on the command line:

    python -m mopd_jax.main --config=configs/qwen3_8b_lcb.py \\
        --config.model.checkpoint=/ckpt/Qwen3-8B --config.data.path=/data/lcb_v6_train.jsonl

Defaults are the spec's, with what the authors' released runs (github viviable/mopd_code, a verl
fork) fix and the spec leaves open: thinking off, 10 warm-up steps, weight decay 0.01,
evaluation at temperature 0.6 / top-p 0.95 with 8 samples, prompts over 2048 tokens filtered
out. `recipe=authors` takes the authors' values where they and the spec differ (RECIPES;
docs/SPEC_VS_AUTHORS.md).
"""

import dataclasses

from mopd_jax import config_lib


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU pod a paper run is planned for: its topology (as `python -m mopd_jax.aot` names it),
  the mesh and the micro-batch that fit it (checked by compiling: experiments/README.md)."""

  topology: str
  mesh: tuple[int, int, int]  # data, fsdp, tensor
  micro_batch_rows: int


# 32 prompts x 8 rollouts per step: a prompt's rollouts stay on one shard, so data x fsdp <= 32
# and the other factor of 64 chips goes to tensor parallelism (which also halves the KV cache per
# chip). fsdp = 32 shards params, AdamW moments and the EMA teacher (128 GB for Qwen3-8B in
# float32) to 2 GB per chip; the micro-batch bounds activations (1 row per shard = 32 rows).
TARGETS: dict[str, Target] = {
    "v5p-64": Target(topology="v5p:4x4x4", mesh=(1, 32, 2), micro_batch_rows=128),
    "v6e-64": Target(topology="v6e:8x8", mesh=(1, 32, 2), micro_batch_rows=64),
}


def apply_target(c, name: str):
  """Mesh, micro-batch and splash attention of a TPU target; `c.tpu.topology` names it for
  `python -m mopd_jax.aot` (its default --topology)."""
  if name not in TARGETS:
    raise ValueError(f"paper config: unknown target {name!r}; known: {sorted(TARGETS)}")
  t = TARGETS[name]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = t.mesh
  c.train.micro_batch_rows = t.micro_batch_rows
  c.model.attention_impl = "splash"
  c.tpu = dict(target=name, topology=t.topology)
  return c


# Where the spec and the authors' scripts differ (docs/SPEC_VS_AUTHORS.md): "spec" keeps the
# spec's values, "authors" takes the scripts' (`apply_recipe`).
RECIPES = ("spec", "authors")


def apply_recipe(c, name: str):
  """`recipe=authors`: what the authors' mopd.sh runs where it differs from the spec: responses
  of at most 4096 tokens (ROLLOUT_RESPONSE_LENGTH; the spec's 8192), their loss aggregation
  (ppo_micro_batch_size_per_gpu=1 with token-mean: a per-sequence mean over every row, masked-out
  ones included) and verified SFT at lr 1e-6 (run_local_sft.sh)."""
  if name not in RECIPES:
    raise ValueError(f"paper config: unknown recipe {name!r}; known: {RECIPES}")
  if name == "authors":
    c.sampling.max_new_tokens = c.eval.max_new_tokens = 4096
    c.data.response_buckets = tuple(b for b in c.data.response_buckets if b <= 4096)
    c.loss.loss_agg = "seq-mean-token-mean-all-rows"
    if c.method == "verified_sft":
      c.optim.lr = 1e-6
  return c


def paper_config(arg, *, preset: str, task_verifier: str, max_new_tokens: int = 8192):
  a = config_lib.parse_arg(arg, method="mopd", checkpoint="", data="", target="v5p-64", recipe="spec")
  c = config_lib.base_config()
  config_lib.apply_method(c, a.method)
  c.model.preset = preset
  c.model.checkpoint = a.checkpoint  # an HF checkpoint directory (required)
  c.model.param_dtype = "float32"  # AdamW and the EMA teacher need f32 master weights
  c.model.dtype = "bfloat16"
  # 2048 + 8192 (student) and 10240 + 8192 (teacher) tokens per row: keep one layer's
  # activations (remat) and 1024-query blocks of attention scores at a time.
  c.model.remat = True
  c.model.attention_chunk = 1024
  # Planned for a TPU pod (`target=v5p-64` default, or `v6e-64`: mesh, micro-batch, splash
  # attention, see TARGETS). On NVIDIA GPUs set --config.model.attention_impl=cudnn and a mesh
  # for the GPUs (attention_chunk is then unused by training and scoring). 1B MOPD step on an
  # H100: 1.51 s with XLA attention, 0.39-0.51 s with cuDNN (experiments/README.md, "GPU runs").
  c.data.task = "jsonl"
  c.data.path = a.data
  c.data.options = {"verifier": task_verifier}
  c.data.train_size = 10**9
  c.data.eval_size = 128
  c.data.prompts_per_step = 32
  c.sampling.group_size = 8
  c.sampling.temperature = 1.0
  c.sampling.max_new_tokens = max_new_tokens
  # The authors' runs are "No-thinking" (their experiment names; verl/trainer/config/user.yaml:
  # apply_chat_template_kwargs enable_thinking false), for rollouts and in-run validation alike
  # (their standalone run_eval_sdpo.sh turns it on for Qwen3: docs/SPEC_VS_AUTHORS.md).
  c.sampling.enable_thinking = False
  c.data.prompt_buckets = (512, 1024, 2048)
  # verl's filter_overlong_prompts at data.max_prompt_length 2048 (user.yaml): dropped at load.
  c.data.max_prompt_len = 2048
  c.data.filter_overlong_prompts = True
  c.data.response_buckets = (1024, 2048, 4096, 8192)
  c.data.teacher_prompt_buckets = (2048, 4096, 8192, 10240)
  c.loss.chunk_size = 256
  c.optim.lr = 1e-5
  # verl's AdamW weight decay (trainer/config/optim/fsdp.yaml) and the scripts' lr_warmup_steps=10.
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 10
  c.teacher.mode = "ema"
  c.teacher.rate = 0.05
  c.train.steps = 200
  c.eval.every = 20
  # user.yaml val_kwargs (temperature 0.6, top_p 0.95) with the scripts' val_kwargs.n=8: mean@8.
  c.eval.num_samples = 8
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = max_new_tokens
  apply_target(c, a.target)
  apply_recipe(c, a.recipe)
  run = f"runs/{preset}-{a.method}" + ("" if a.recipe == "spec" else f"-{a.recipe}")
  c.checkpoint.dir = f"{run}/checkpoints"
  c.checkpoint.every = 10
  c.logging.dir = run
  return c
