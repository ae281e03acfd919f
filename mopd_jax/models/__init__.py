"""Model family: config, presets, the NNX transformer and its KV cache."""

from mopd_jax.models.config import FAMILIES, PRESETS, ModelConfig, RopeScaling, get_preset, tiny_config
from mopd_jax.models.transformer import (
    KVCache, ModelOutput, Transformer, abstract_model, init_model, positions_from_segments)

__all__ = [
    "FAMILIES", "PRESETS", "ModelConfig", "RopeScaling", "get_preset", "tiny_config", "KVCache",
    "ModelOutput", "Transformer", "abstract_model", "init_model", "positions_from_segments",
]
