"""Decoder-only transformer (Llama / SmolLM2, Qwen2.5, Qwen3) in Flax NNX.

One module covers the three families; they differ only in switches of `ModelConfig`:
Qwen2.5 adds biases to q/k/v, Qwen3 RMS-normalises q and k per head, Llama-3.x scales RoPE.

Conventions
- Kernels are stored [in, out] (the transpose of Hugging Face's `nn.Linear.weight`).
- Fused projections (`ModelConfig.fused_projections`, the default): one matmul for q/k/v and
  one for gate/up per layer. `self_attn.qkv_proj.kernel` is [embed, kv_heads, G + 2, head_dim]
  (G = num_heads / num_kv_heads): per kv head, its G query heads, its key, its value; query
  head h is kv head h // G's, as in HF; the qkv bias (Qwen2.5) is [kv_heads, G + 2, head_dim].
  `mlp.gate_up_proj.kernel` is [embed, 2, mlp] (gate, up). Split over the tensor axis by kv
  heads (resp. mlp units), each device holds whole q/k/v groups (gate/up pairs). Unfused, the
  Hugging Face modules instead (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`);
  `mopd_jax.weights` reads and writes either layout from and to HF's separate tensors.
- Parameters carry logical axis names (`embed`, `vocab`, `mlp`, `q_heads`, `kv_heads`,
  `fused`, `head_dim`, `norm`); `mopd_jax.sharding` maps them onto mesh axes.
- Attention is driven by `positions` (RoPE) and `segment_ids` (0 = padding): a query attends
  to keys of the same non-zero segment at the same or an earlier *slot*. This one rule
  covers left padding, right padding and packed sequences.
- Softmax and logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mopd_jax.models.config import ModelConfig

Array = jax.Array
_MASKED = -1e30  # finite: a fully-masked (padding) query row stays NaN-free


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer over `max_len` slots, plus which slots hold which segment.

  Stacked over layers ([L, ...]) like the layer parameters, so the scanned decoder carries
  the whole cache and each layer writes its new tokens in place.
  `segment_ids[b, s] == 0` marks an empty (or padding) slot. `index` is the next slot to
  write. A scalar index: all rows write the same slot (prompts are left-padded), which keeps
  updates a single `dynamic_update_slice`. An index of shape [B]: each row writes its own
  slot (the sampler's continuous refill, where rows start decoding at different steps), one
  in-place scatter per layer.
  """

  # Heads before slots: attention contracts over D and S with (B, KVH) as batch dims, so
  # this is the layout XLA's dot wants; [B, S, KVH, D] made it transpose the whole cache in
  # every layer of every decode step (measured 1.2-1.5x slower decode on CPU).
  keys: Array  # [L, B, KVH, S, D]
  values: Array  # [L, B, KVH, S, D]
  segment_ids: Array  # [B, S] int32
  index: Array  # [] or [B] int32

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, max_len: int, per_row_index: bool = False) -> "KVCache":
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return cls(
        keys=jnp.zeros(shape, config.jnp_dtype), values=jnp.zeros(shape, config.jnp_dtype),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((batch,) if per_row_index else (), jnp.int32))

  def repeat_rows(self, n: int) -> "KVCache":
    """Each row copied n times, consecutively: prompt b -> rows b*n .. b*n+n-1."""
    return KVCache(
        keys=jnp.repeat(self.keys, n, axis=1), values=jnp.repeat(self.values, n, axis=1),
        segment_ids=jnp.repeat(self.segment_ids, n, axis=0), index=self.index)


@flax.struct.dataclass
class LayerCache:
  """One layer's view of the stacked cache inside the layer scan.

  Holds the whole [L, ...] stacks: a layer first writes its new keys/values into them (an
  in-place update of the scan carry), then reads its own layer back for attention. Reading
  the layer slice before writing made XLA copy the whole stacked cache in every layer of
  every decode step (measured: decode 13x slower on CPU).
  """

  keys: Array  # [L, B, KVH, S, D]
  values: Array  # [L, B, KVH, S, D]
  layer: Array  # [] int32
  index: Array  # [] or [B] int32 (see KVCache.index), the slot this call's first token is written to

  def write(self, k: Array, v: Array) -> "LayerCache":
    """Store this call's k/v ([B, KVH, T, D]) at slots index .. index + T - 1 of this layer."""
    if self.index.ndim == 0:
      at = (self.layer, 0, 0, self.index, 0)
      put = lambda stack, new: jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), at)
    else:
      # One scatter of [B, T] (row, slot) pairs, in place on the scan carry. (A vmapped
      # dynamic_update_slice gave the cache a row-major layout and a copy per layer and step.)
      rows, slots = jnp.arange(k.shape[0])[:, None], self.index[:, None] + jnp.arange(k.shape[2])
      put = lambda stack, new: stack.at[self.layer, rows, :, slots].set(new.transpose(0, 2, 1, 3).astype(stack.dtype))
    return self.replace(keys=put(self.keys, k), values=put(self.values, v))

  def layer_kv(self) -> tuple[Array, Array]:
    """This layer's keys and values, each [B, KVH, S, D]."""
    take = lambda x: jax.lax.dynamic_index_in_dim(x, self.layer, axis=0, keepdims=False)
    return take(self.keys), take(self.values)


@flax.struct.dataclass
class ModelOutput:
  hidden: Array  # [B, T, hidden] final-norm output, compute dtype
  logits: Optional[Array]  # [B, T, V] float32, or None when not requested
  cache: Optional[KVCache]


def _partitioned(init, names: tuple[Optional[str], ...]):
  return nnx.with_partitioning(init, names)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, config: ModelConfig):
    self.eps = eps
    self.dtype = config.jnp_dtype
    self.scale = nnx.Param(
        _partitioned(nnx.initializers.ones, ("norm",))(jax.random.key(0), (dim,), config.jnp_param_dtype))

  def __call__(self, x: Array) -> Array:
    # Matches HF: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * self.scale.value.astype(self.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Array:
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  # Llama-3.x: long wavelengths are slowed by `factor`, short ones kept, the band between
  # interpolated smoothly.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """HF "rotate_half" RoPE. x: [B, T, N, D], positions: [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def same_segment_mask(q_segments: Array, k_segments: Array) -> Array:
  """[B, Tq, Tk] bool: the key is in the query's segment, and not padding."""
  return (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)


def attention_mask(q_segments: Array, q_slots: Array, k_segments: Array) -> Array:
  """[B, Tq, Tk] bool: same non-zero segment, key slot <= query slot."""
  k_slots = jnp.arange(k_segments.shape[1])
  causal = k_slots[None, None, :] <= q_slots[:, :, None]
  return same_segment_mask(q_segments, k_segments) & causal


def _linear(config: ModelConfig, din: int, dout: int | tuple[int, ...], names, *, bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear | nnx.LinearGeneral:
  """[..., din] -> [..., dout], or [..., *dout] for a tuple: one matmul with kernel [din, *dout] and
  bias [*dout] (fused projections). `names`: the kernel's logical axis names."""
  options = dict(
      use_bias=bias, dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
      kernel_init=_partitioned(nnx.initializers.normal(0.02), names),
      bias_init=_partitioned(nnx.initializers.zeros, tuple(names[1:])), rngs=rngs)
  if isinstance(dout, tuple):
    return nnx.LinearGeneral(din, dout, **options)
  return nnx.Linear(din, dout, **options)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    h, d = config.hidden_size, config.head_dim
    bias = config.qkv_bias
    if config.fused_projections:
      # Per kv head: its query heads, its key, its value. Split over `kv_heads`, each device
      # holds the whole q/k/v of its heads: one matmul, and attention needs nothing from others.
      qkv = (config.num_kv_heads, config.num_heads // config.num_kv_heads + 2, d)
      self.qkv_proj = _linear(config, h, qkv, ("embed", "kv_heads", "fused", "head_dim"), bias=bias, rngs=rngs)
    else:
      self.q_proj = _linear(config, h, config.num_heads * d, ("embed", "q_heads"), bias=bias, rngs=rngs)
      self.k_proj = _linear(config, h, config.num_kv_heads * d, ("embed", "kv_heads"), bias=bias, rngs=rngs)
      self.v_proj = _linear(config, h, config.num_kv_heads * d, ("embed", "kv_heads"), bias=bias, rngs=rngs)
    self.o_proj = _linear(config, config.num_heads * d, h, ("q_heads", "embed"), bias=False, rngs=rngs)
    if config.qk_norm:
      self.q_norm = RMSNorm(d, config.rms_norm_eps, config)
      self.k_norm = RMSNorm(d, config.rms_norm_eps, config)

  def _project(self, x: Array) -> tuple[Array, Array, Array]:
    """q [B, T, H, D], k and v [B, T, KVH, D]; query head h belongs to kv head h // (H / KVH)."""
    c = self.config
    b, t, _ = x.shape
    if not c.fused_projections:
      return (self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim),
              self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim),
              self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim))
    qkv = self.qkv_proj(x)  # [B, T, KVH, G + 2, D]
    g = c.num_heads // c.num_kv_heads
    return qkv[..., :g, :].reshape(b, t, c.num_heads, c.head_dim), qkv[..., g, :], qkv[..., g + 1, :]

  def __call__(self, x, positions, q_segments, q_slots, inv_freq, layer_cache, kv_segments, fresh_cache=False):
    """layer_cache: None (keys are this call's tokens) or this layer's `LayerCache`, returned
    with this call's keys/values written.

    fresh_cache: the cache is empty and this call writes from slot 0 (a prefill), so the
    keys are exactly this call's tokens and the full-sequence kernels apply.
    """
    c = self.config
    b, t, _ = x.shape
    q, k, v = self._project(x)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if layer_cache is not None:
      layer_cache = layer_cache.write(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    if layer_cache is None or fresh_cache:
      out = self._full_sequence_attention(q, k, v, q_segments)
    else:
      cached_k, cached_v = layer_cache.layer_kv()
      out = self._grouped(q, cached_k, cached_v, attention_mask(q_segments, q_slots, kv_segments))
    return self.o_proj(out.reshape(b, t, -1)), layer_cache

  def _full_sequence_attention(self, q, k, v, segments):
    """Attention of a whole sequence to itself (slot i sees slots <= i of its segment).
    q [B,T,H,D], k/v [B,T,KVH,D]."""
    impl = self.config.attention_impl
    if impl == "cudnn":
      return cudnn_attention(q, k, v, segments)
    if impl == "splash":
      from mopd_jax.models import splash  # Pallas TPU; imported only when chosen
      return splash.splash_attention(q, k, v, segments)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, D]
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), segments.shape)
    return self._grouped(q, k, v, attention_mask(segments, slots, segments))

  def _grouped(self, q, k, v, mask):
    if 0 < self.config.attention_chunk < q.shape[1]:
      return chunked_grouped_attention(q, k, v, mask, self.config.attention_chunk)
    return grouped_attention(q, k, v, mask)


def grouped_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """GQA without repeating k/v. q [B,T,H,D], k/v [B,KVH,S,D], mask [B,T,S] -> [B,T,H,D]."""
  b, t, h, d = q.shape
  kvh = k.shape[1]
  q = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """cuDNN flash attention over one full sequence per row (no cache): causal, and a query
  sees only keys of its own non-zero segment. q [B,T,H,D], k/v [B,T,KVH,D] -> [B,T,H,D].

  The segment rule goes in as a [B, 1, T, T] boolean mask, which JAX turns into an additive
  bias broadcast over heads (read per tile, never a [B, H, T, T] tensor); `is_causal` lets
  cuDNN skip the blocks above the diagonal. Padding queries see no key and get a uniform
  average of values (finite; their outputs are masked out downstream, as on the XLA path).
  """
  if jax.default_backend() != "gpu":
    raise ValueError(
        f"ModelConfig.attention_impl='cudnn' needs an NVIDIA GPU backend; this process runs on "
        f"{jax.default_backend()!r}: use attention_impl='xla'")
  return jax.nn.dot_product_attention(
      q, k, v, mask=same_segment_mask(segment_ids, segment_ids)[:, None], is_causal=True, implementation="cudnn")


def chunked_grouped_attention(q: Array, k: Array, v: Array, mask: Array, chunk: int) -> Array:
  """`grouped_attention` one block of `chunk` queries at a time.

  Each block is checkpointed, so the backward pass keeps only the block's inputs and
  recomputes its [B, H, chunk, S] scores: attention memory no longer grows with T x S.
  Every query still sees every key, so no running softmax is needed (unlike flash attention,
  which also blocks the keys). A last partial block is padded with fully masked queries.
  """
  b, t, h, d = q.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  q_blocks = q.reshape(b, n, chunk, h, d).swapaxes(0, 1)  # [n, B, chunk, H, D]
  mask_blocks = mask.reshape(b, n, chunk, -1).swapaxes(0, 1)  # [n, B, chunk, S]
  block = jax.checkpoint(lambda qm: grouped_attention(qm[0], k, v, qm[1]))
  out = jax.lax.map(block, (q_blocks, mask_blocks))  # [n, B, chunk, H, D]
  return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    h, m = config.hidden_size, config.intermediate_size
    self.fused = config.fused_projections
    if self.fused:  # gate and up of an mlp unit side by side: split over `mlp`, they stay together
      self.gate_up_proj = _linear(config, h, (2, m), ("embed", "fused", "mlp"), bias=False, rngs=rngs)
    else:
      self.gate_proj = _linear(config, h, m, ("embed", "mlp"), bias=False, rngs=rngs)
      self.up_proj = _linear(config, h, m, ("embed", "mlp"), bias=False, rngs=rngs)
    self.down_proj = _linear(config, m, h, ("mlp", "embed"), bias=False, rngs=rngs)

  def __call__(self, x):
    if self.fused:
      # One matmul, the (gate, up) axis leading its output: as LinearGeneral's [..., 2, M] the 2
      # lands in a TPU tile (padded to 8); the qwen3-8b v5p train step then needed 8.51 GiB per
      # chip, 7.73 this way (unfused: 9.00; experiments/README.md, "Fused q/k/v and gate/up").
      kernel = self.gate_up_proj.kernel.value.astype(self.gate_up_proj.dtype)
      gate, up = jnp.einsum("...e,efm->f...m", x, kernel)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, q_segments, q_slots, inv_freq, layer_cache, kv_segments, fresh_cache=False):
    attn, new_cache = self.self_attn(
        self.input_layernorm(x), positions, q_segments, q_slots, inv_freq, layer_cache, kv_segments, fresh_cache)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_cache


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """One DecoderLayer whose every parameter has a leading [num_layers] axis (logical name
  `layers`), each layer initialised from its own split of `rngs`."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(layer_rngs: nnx.Rngs) -> DecoderLayer:
    return DecoderLayer(config, rngs=layer_rngs)

  return create(rngs)


class Transformer(nnx.Module):
  """Decoder-only LM. Call with tokens, positions and segment ids; optionally a KV cache.

  The layers are one stacked DecoderLayer applied with `lax.scan`: the program holds one
  layer's code whatever the depth (compile time flat in depth), and remat wraps the scanned
  layer once. `scan_layers=False` unrolls the same stacked parameters instead.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    # Parameters are created unsharded; `mopd_jax.sharding` places them on a mesh after
    # mapping their logical axis names (flax's eager sharding would need a mesh here).
    with nnx.use_eager_sharding(False):
      self._build(config, rngs)

  def _build(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=config.jnp_dtype,
        param_dtype=config.jnp_param_dtype,
        embedding_init=_partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
    self.layers = _stacked_layers(config, rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(
          config.hidden_size, config.vocab_size, use_bias=False, dtype=config.jnp_dtype,
          param_dtype=config.jnp_param_dtype,
          kernel_init=_partitioned(nnx.initializers.normal(0.02), ("embed", "vocab")), rngs=rngs)

  def unembedding(self) -> Array:
    """[hidden, vocab] matrix mapping final hidden states to logits."""
    if self.config.tie_embeddings:
      return self.embed_tokens.embedding.value.T
    return self.lm_head.kernel.value

  def logits(self, hidden: Array) -> Array:
    w = self.unembedding().astype(hidden.dtype)
    return jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)

  def __call__(
      self,
      tokens: Array,  # [B, T] int32
      positions: Array,  # [B, T] int32 (RoPE positions)
      segment_ids: Array,  # [B, T] int32, 0 = padding
      cache: Optional[KVCache] = None,
      *,
      return_logits: bool = True,
      fresh_cache: bool = False,
  ) -> ModelOutput:
    """fresh_cache: `cache` is empty (index 0), as in a prefill: attention runs over this
    call's tokens alone with the full-sequence kernel (`attention_impl`), and their keys and
    values are written to the cache. Only valid on a cache nothing has been written to."""
    t = tokens.shape[1]
    inv_freq = rope_inverse_frequencies(self.config)
    x = self.embed_tokens(tokens)
    layer_def, layer_params = nnx.split(self.layers)
    if cache is None:
      q_slots = jnp.broadcast_to(jnp.arange(t), tokens.shape)

      def layer(x, params):
        x, _ = nnx.merge(layer_def, params)(x, positions, segment_ids, q_slots, inv_freq, None, segment_ids)
        return x, None

      x = self._over_layers(self._remat(layer), x, layer_params)
      new_cache = None
    else:
      index = cache.index
      if index.ndim == 0:
        q_slots = jnp.broadcast_to(index + jnp.arange(t), tokens.shape)
        kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, index))
      else:  # each row at its own slot (KVCache.index)
        q_slots = index[:, None] + jnp.arange(t)
        kv_segments = cache.segment_ids.at[jnp.arange(tokens.shape[0])[:, None], q_slots].set(
            segment_ids.astype(jnp.int32))

      def layer(carry, params_and_depth):
        x, keys, values = carry
        params, depth = params_and_depth
        x, layer_cache = nnx.merge(layer_def, params)(
            x, positions, segment_ids, q_slots, inv_freq, LayerCache(keys, values, depth, index), kv_segments,
            fresh_cache)
        return (x, layer_cache.keys, layer_cache.values), None

      depths = jnp.arange(self.config.num_layers)
      x, keys, values = self._over_layers(layer, (x, cache.keys, cache.values), (layer_params, depths))
      new_cache = KVCache(keys=keys, values=values, segment_ids=kv_segments, index=index + t)
    hidden = self.norm(x)
    logits = self.logits(hidden) if return_logits else None
    return ModelOutput(hidden=hidden, logits=logits, cache=new_cache)

  def _over_layers(self, layer_fn: Callable, carry, per_layer):
    """`layer_fn(carry, layer_slice) -> (carry, None)` over the layers: a scan, or a Python
    loop (`scan_layers=False`: one copy of the layer per depth in the program, as before
    scanning; kept to measure compile time and to debug one layer)."""
    if self.config.scan_layers:
      return jax.lax.scan(layer_fn, carry, per_layer)[0]
    for i in range(self.config.num_layers):
      carry, _ = layer_fn(carry, jax.tree.map(lambda x: x[i], per_layer))
    return carry

  def _remat(self, layer_fn: Callable) -> Callable:
    if not self.config.remat:
      return layer_fn
    # remat_policy names one of jax.checkpoint_policies (validated by ModelConfig).
    # Inside scan, CSE across iterations cannot undo the recomputation, so the barriers that
    # prevent_cse adds are only needed when the layers are unrolled.
    policy = getattr(jax.checkpoint_policies, self.config.remat_policy)
    return jax.checkpoint(layer_fn, policy=policy, prevent_cse=not self.config.scan_layers)


def left_padded_segments(lengths: Array, width: int) -> Array:
  """[B, width] int32 segment ids of left-padded rows: 1 on each row's last lengths[b] slots."""
  return (jnp.arange(width)[None, :] >= (width - lengths)[:, None]).astype(jnp.int32)


def right_padded_segments(lengths: Array, width: int) -> Array:
  """[B, width] int32 segment ids of right-padded rows: 1 on each row's first lengths[b] slots."""
  return (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)


def positions_from_segments(segment_ids: Array) -> Array:
  """RoPE positions restarting at 0 at the start of each segment (padding gets 0).

  Assumes each segment is contiguous in its row, which covers left padding, right padding
  and packed rows.
  """
  t = segment_ids.shape[1]
  slots = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids != previous, slots, 0)
  segment_start = jax.lax.cummax(starts, axis=1)
  return jnp.where(segment_ids != 0, slots - segment_start, 0).astype(jnp.int32)


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves: no memory, for shapes and sharding plans."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
