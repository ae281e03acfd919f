"""Paper run: an external Qwen3-14B teacher distilling into Qwen3-4B, the teacher conditioned on peers.

    python -m mopd_jax.main --config=configs/qwen3_14b_to_4b.py:checkpoint=/ckpt/Qwen3-4B,data=/data/train.jsonl \
        --config.teacher.external_checkpoint=/ckpt/Qwen3-14B

`method=` picks the teacher's context; every distillation method scores with the external 14B,
frozen (never updated):
- `mopd` (default): the 2S1F peer context (two successes and a failure of the same prompt);
- `sdpo`: the first success, else the verifier's feedback: the authors' teacher-student script
  (run_ts_sdpo.sh: the student's reference model replaced by the larger teacher, EMA rate 0.0,
  include_another_solution and include_failure_solution False);
- `plain_opd`: the original prompt only (on-policy distillation without peers);
- the other peer presets and controls (`positive_only`, `random_peer`, ...).
Baselines without a teacher (`grpo`, `dpo`, `simpo`, `verified_sft`) load no 14B model; their
reference (DPO, GRPO's optional KL) is the initial student.
"""

from configs.paper_common import paper_config
from mopd_jax import config_lib, methods


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="mopd", checkpoint="", data="", target="v5p-64", recipe="spec")
  c = paper_config(f"method={a.method},checkpoint={a.checkpoint},data={a.data},target={a.target},recipe={a.recipe}",
                   preset="qwen3-4b", task_verifier="code")
  if methods.get(c.method).uses_teacher_contexts:
    c.teacher.mode = "external"  # never updated: the authors' teacher_update_rate=0.0
    c.teacher.external_preset = "qwen3-14b"
    c.teacher.external_checkpoint = ""  # the 14B HF directory (required); tokenizers must match
  else:
    # Nothing to distill from: a 14B teacher would only take memory.
    c.teacher.mode = "frozen"
  return c
