"""Paper run: external Qwen3-14B teacher distilling into Qwen3-4B (plain OPD and MOPD variants).

    python -m mopd_jax.main --config=configs/qwen3_14b_to_4b.py:checkpoint=/ckpt/Qwen3-4B,data=/data/train.jsonl \
        --config.teacher.external_checkpoint=/ckpt/Qwen3-14B
"""

from configs.paper_common import paper_config
from mopd_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="plain_opd", checkpoint="", data="", target="v5p-64")
  c = paper_config(f"method={a.method},checkpoint={a.checkpoint},data={a.data},target={a.target}",
                   preset="qwen3-4b", task_verifier="code")
  c.teacher.mode = "external"
  c.teacher.external_preset = "qwen3-14b"
  c.teacher.external_checkpoint = ""  # the 14B HF directory (required); tokenizers must match
  return c
