"""GGUF (llama.cpp) checkpoints: model config and weights from one file.

Weights are dequantised tensor by tensor with `gguf.quants.dequantize` (float32 on host) and
placed straight into their target sharding. llama.cpp's converter permutes the rows of the
q and k projections of llama-architecture models (its RoPE pairs adjacent elements, HF's
pairs the two halves of a head); we undo that permutation so the weights fit the HF layout
our model uses. Qwen2/Qwen3 files are not permuted by the converter. The file's separate
attn_q/attn_k/attn_v and ffn_gate/ffn_up tensors fill our fused `qkv_proj` and `gate_up_proj`
(`mopd_jax.weights.common`); `save_hf_checkpoint` writes them out separately again, exactly.

The file's tokenizer is the tokenizer module's (`mopd_jax.tokenizer.load_gguf_tokenizer`); the
reader both use is `mopd_jax.gguf_reader`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from mopd_jax.gguf_reader import metadata, open_gguf
from mopd_jax.models.config import ModelConfig
from mopd_jax.models.transformer import Transformer, abstract_model
from mopd_jax.weights import common
from mopd_jax.weights.hf import CheckpointError

PathLike = Union[str, os.PathLike]

# general.architecture -> our family.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Our layer submodule path -> llama.cpp tensor name inside `blk.{i}.`.
_LAYER_NAMES = {
    ("input_layernorm",): "attn_norm",
    ("post_attention_layernorm",): "ffn_norm",
    ("self_attn", "q_proj"): "attn_q",
    ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v",
    ("self_attn", "o_proj"): "attn_output",
    ("self_attn", "q_norm"): "attn_q_norm",
    ("self_attn", "k_norm"): "attn_k_norm",
    ("mlp", "gate_proj"): "ffn_gate",
    ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}
_LEAF_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# --------------------------------------------------------------------------------------------
# Config


def config_from_gguf(
    meta: Mapping[str, Any], tensor_names: Sequence[str], *, vocab_size: Optional[int] = None,
    param_dtype: str = "float32", dtype: Optional[str] = None,
) -> ModelConfig:
  """ModelConfig from GGUF metadata (`{arch}.*` keys) and the file's tensor names."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF: unsupported general.architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
  names = set(tensor_names)
  if "rope_freqs.weight" in names:
    raise ValueError("GGUF: rope_freqs.weight (Llama-3.x RoPE scaling baked into the file) is not supported; "
                     "import the HF safetensors checkpoint instead")
  scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling_type not in ("none", None):
    raise ValueError(f"GGUF: {arch}.rope.scaling.type={scaling_type!r} is not supported")

  def get(key: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF: metadata key {arch}.{key} is missing")
    return value

  hidden = int(get("embedding_length"))
  heads = int(get("attention.head_count"))
  family = ARCHITECTURES[arch]
  if vocab_size is None:
    vocab_size = int(get("vocab_size", 0)) or None
  if vocab_size is None:
    raise ValueError(f"GGUF: no {arch}.vocab_size and no tokenizer vocabulary to count")
  return ModelConfig(
      family=family,  # type: ignore[arg-type]
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // heads),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      tie_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      qk_norm="blk.0.attn_q_norm.weight" in names,
      max_position_embeddings=int(get("context_length", 8192)),
      param_dtype=param_dtype,
      dtype=dtype or param_dtype,
  )


# --------------------------------------------------------------------------------------------
# Weights


def gguf_tensor_name(path: common.ParamPath) -> tuple[str, bool]:
  """llama.cpp name of one of our parameters, and whether our layout is its transpose."""
  keys = tuple(str(k) for k in path)
  if keys == ("embed_tokens", "embedding"):
    return "token_embd.weight", False
  if keys == ("norm", "scale"):
    return "output_norm.weight", False
  if keys == ("lm_head", "kernel"):
    return "output.weight", True
  if keys[0] == "layers" and keys[2:-1] in _LAYER_NAMES and keys[-1] in _LEAF_SUFFIX:
    return f"blk.{keys[1]}.{_LAYER_NAMES[keys[2:-1]]}.{_LEAF_SUFFIX[keys[-1]]}", keys[-1] == "kernel"
  raise KeyError(f"no GGUF name for parameter {common.path_str(path)}")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf's `permute` of q/k rows ([out, ...] layout, HF order out)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """convert_hf_to_gguf's permutation (HF -> llama.cpp); used by tests to write GGUF files."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(tensor) -> np.ndarray:
  """float32 (or the file's float type) array in numpy order, i.e. HF's [out, in] layout."""
  import gguf

  array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions fastest first
  return np.asarray(array).reshape(shape)


def load_gguf(
    path: PathLike,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    param_dtype: str = "float32",
    dtype: Optional[str] = None,
) -> Transformer:
  """The model in a GGUF file, dequantised to `param_dtype`, placed on `mesh` (or the
  default device). Quantised blocks dequantise exactly to float32 values."""
  reader = open_gguf(path)
  tensors = {t.name: t for t in reader.tensors}
  meta = metadata(reader)
  vocab = None
  if "tokenizer.ggml.tokens" in reader.fields:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  config = config_from_gguf(meta, list(tensors), vocab_size=vocab, param_dtype=param_dtype, dtype=dtype)
  # Our vocabulary follows the embedding matrix when the two disagree (padded vocabularies).
  embd = tensors.get("token_embd.weight")
  if embd is not None and int(embd.shape[1]) != config.vocab_size:
    config = config.replace(vocab_size=int(embd.shape[1]))
  permute = config.family == "llama"

  abstract = abstract_model(config)
  file_params = common.file_params(abstract)
  names = {t.file_path: gguf_tensor_name(t.file_path) for t in file_params}
  shapes = {t.file_path: t.shape for t in file_params}
  missing = sorted(name for name, _ in names.values() if name not in tensors)
  if missing:
    raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {', '.join(missing[:10])}")
  unexpected = sorted(set(tensors) - {name for name, _ in names.values()})
  if unexpected:
    raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:10])}")
  for path_, (name, transpose) in names.items():
    found = tuple(int(n) for n in reversed(tensors[name].shape))
    want = tuple(reversed(shapes[path_])) if transpose else shapes[path_]
    if found != want:
      raise CheckpointError(f"{path}: tensor {name} has shape {found}, the metadata implies {want}")

  def reader(path_, shape):
    name, transpose = names[path_]

    @functools.cache
    def whole() -> np.ndarray:  # one whole tensor on host, once: quantised blocks span rows
      array = _dequantized(tensors[name])
      if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
        array = unpermute_rotary(array, config.num_heads)
      elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
        array = unpermute_rotary(array, config.num_kv_heads)
      return array.T if transpose else array

    return lambda index: whole()[index]

  return common.assemble(abstract, reader, mesh=mesh, rules=rules)
