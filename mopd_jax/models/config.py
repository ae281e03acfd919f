"""Model configuration and presets built from public Hugging Face config values."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Family = Literal["llama", "qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
ATTENTION_IMPLS: tuple[str, ...] = ("xla", "cudnn", "splash")
# Names of jax.checkpoint_policies a rematerialised layer may use.
REMAT_POLICIES: tuple[str, ...] = (
    "nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.x frequency-dependent RoPE scaling ("rope_type": "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer. Hashable: usable as a static jit argument."""

  family: Family
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2 / Qwen2.5
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
  max_position_embeddings: int = 8192
  param_dtype: str = "float32"  # "float32" | "bfloat16"
  dtype: str = "float32"  # compute dtype; softmax and logits are always float32
  remat: bool = False  # recompute each layer in the backward pass (activation memory ~ one layer)
  # What the backward pass may keep of a rematerialised layer (names of jax.checkpoint_policies).
  remat_policy: str = "nothing_saveable"
  # Apply the stacked layers with lax.scan (one layer in the compiled program). False unrolls
  # them in Python: same parameters and results, compile time grows with depth.
  scan_layers: bool = True
  # Query block for memory-bounded attention: with T > attention_chunk queries, scores are
  # computed (and recomputed in the backward pass) one block at a time, so they take
  # [B, H, attention_chunk, S] instead of [B, H, T, S]. 0 = dense.
  attention_chunk: int = 0
  # "xla": attention as plain einsums (every backend; the decode path always uses it).
  # "cudnn": cuDNN's fused flash attention for full-sequence calls (training, scoring,
  # prefill without a cache) on NVIDIA GPUs; it never forms the [B, H, T, S] scores.
  # "splash": the Pallas splash attention kernel for the same calls, on TPUs
  # (`mopd_jax.models.splash`; interpreted on CPU, for tests).
  attention_impl: str = "xla"
  # One matmul for q/k/v and one for gate/up in each layer (decode runs 4 projection GEMMs per
  # layer instead of 7). It changes the parameters: `self_attn.qkv_proj` [embed, kv_heads,
  # num_heads / num_kv_heads + 2, head_dim] (per kv head: its query heads, its key, its value)
  # and `mlp.gate_up_proj` [embed, 2, mlp] replace q/k/v_proj and gate/up_proj, so an orbax
  # checkpoint of one layout does not restore into the other; HF and GGUF files load into
  # either, exactly (`mopd_jax.weights`). Fused, tensor parallelism splits whole kv heads: the
  # tensor axis must divide num_kv_heads (unfused, it need only divide the projection widths).
  fused_projections: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family: unknown architecture {self.family!r}; known: {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if not (isinstance(self.attention_chunk, int) and self.attention_chunk >= 0):
      raise ValueError(f"ModelConfig.attention_chunk must be an int >= 0, got {self.attention_chunk!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError(f"ModelConfig.attention_impl='cudnn' needs dtype='bfloat16' (cuDNN flash attention "
                       f"has no float32 kernel), got dtype={self.dtype!r}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"ModelConfig.{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count, computed from the shapes (checked against eval_shape in tests)."""
    h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
    q = self.num_heads * self.head_dim
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
    attn += 2 * self.head_dim if self.qk_norm else 0
    mlp = 3 * h * self.intermediate_size
    layer = attn + mlp + 2 * h
    embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
    return embed + self.num_layers * layer + h


_LLAMA3_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _qwen3(hidden, inter, layers, heads, tie) -> ModelConfig:
  return ModelConfig(
      family="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
      num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
      rms_norm_eps=1e-6, tie_embeddings=tie, qk_norm=True, max_position_embeddings=40960,
      param_dtype="bfloat16", dtype="bfloat16")


PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=8192, param_dtype="bfloat16", dtype="bfloat16"),
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=131072,
        param_dtype="bfloat16", dtype="bfloat16"),
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
        param_dtype="bfloat16", dtype="bfloat16"),
    # Qwen/Qwen3-*B config.json
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tie=False),
}


def tiny_config(family: Family = "llama", **overrides) -> ModelConfig:
  """A few-layer float32 model for tests and smoke runs."""
  base = dict(
      family=family, vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_embeddings=family != "qwen2", qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      max_position_embeddings=512)
  base.update(overrides)
  return ModelConfig(**base)


def get_preset(name: str) -> ModelConfig:
  if name.startswith("tiny"):
    family = name.split("-", 1)[1] if "-" in name else "llama"
    return tiny_config(family)  # type: ignore[arg-type]
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)} and tiny-<family>") from None
