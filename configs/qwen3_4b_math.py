"""Paper run: qwen3-4b, DeepMath training, AIME evaluation (math). Needs a local checkpoint and JSONL data (schema:
mopd_jax/tasks/jsonl.py):

    python -m mopd_jax.main --config=configs/qwen3_4b_math.py:checkpoint=/ckpt/DIR,data=/data/train.jsonl
"""

from configs.paper_common import paper_config


def get_config(arg=None):
  return paper_config(arg, preset="qwen3-4b", task_verifier="math")
