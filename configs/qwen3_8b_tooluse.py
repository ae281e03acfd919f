"""Paper run: qwen3-8b, ToolAlpaca (tool calls). Needs a local checkpoint and JSONL data (schema:
mopd_jax/tasks/jsonl.py):

    python -m mopd_jax.main --config=configs/qwen3_8b_tooluse.py:checkpoint=/ckpt/DIR,data=/data/train.jsonl
"""

from configs.paper_common import paper_config


def get_config(arg=None):
  return paper_config(arg, preset="qwen3-8b", task_verifier="tool_call")
