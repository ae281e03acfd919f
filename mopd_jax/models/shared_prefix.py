"""One forward over many suffixes that share a few prefixes, each prefix encoded once.

    out = forward_with_shared_prefixes(model, prefixes, prefix_segments, tokens, segments, prefix_of,
                                       group_size=G)
    out.suffix_hidden[r, t]   # = hidden of token t of row r in model([prefixes[prefix_of[r]] | tokens[r]])
    out.prefix_last_hidden[r]  # = hidden of the last token of row r's prefix (it predicts token 0)

Why: in a MOPD step every rollout is scored by the teacher under a context built from its
peers, and most rollouts of a group share that context (every failure sees the same
successes). A forward over `[context | response]` per row pays for the context once per row;
here each distinct context of a group is encoded once and every row attends to it.

How: the layers run over two streams at once. At each layer the prefix stream ([C, Lc],
left-padded) runs its own causal attention (the full-sequence kernel: splash on TPU, cuDNN on
GPU) and keeps that layer's keys/values; each suffix row ([N, T], right-padded) then attends
to its prefix's keys/values (gathered *within its group*, so rows and their prefixes stay on
the same batch shard) followed by its own, exactly as a KV-cache continuation does. Only one
layer's gathered keys/values ([N, KVH, Lc + T, D]) live at a time, so memory stays that of an
uncached forward over the rows plus one layer of cache.

Layout: rows are grouped: row r belongs to group r // group_size, and group p owns prefixes
p*K .. p*K + K - 1 (K = C // (N // group_size)); `prefix_of[r]` is the row's prefix within its
group, in [0, K). Prefixes are left-padded (segment 0 on padding; a prefix needs >= 1 token),
suffixes right-padded. The suffix attention is XLA's (chunked by `attention_chunk`), as in
cached decoding.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mopd_jax.models.transformer import LayerCache, Transformer, positions_from_segments, rope_inverse_frequencies

Array = jax.Array


@flax.struct.dataclass
class SharedPrefixOutput:
  suffix_hidden: Array  # [N, T, D] final-norm hidden of every suffix token
  prefix_last_hidden: Array  # [N, D] final-norm hidden of the last token of each row's prefix


def within_groups(x: Array, prefix_of: Array, group_size: int) -> Array:
  """x [C, ...] (group p owns rows p*K ..) -> [N, ...]: row r takes x[(r // G) * K + prefix_of[r]].

  A gather batched over groups (vmap), not a flat `take`: with groups sharded over the batch
  axes, XLA sees that each shard reads only its own prefixes and moves no keys/values."""
  groups = prefix_of.shape[0] // group_size
  per_group = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
  picked = jax.vmap(lambda table, rows: jnp.take(table, rows, axis=0))(per_group, prefix_of.reshape(groups, -1))
  return picked.reshape(prefix_of.shape[0], *x.shape[1:])


def check_layout(num_prefixes: int, num_rows: int, group_size: int) -> None:
  if group_size < 1 or num_rows % group_size:
    raise ValueError(f"shared prefixes: {num_rows} rows are not whole groups of {group_size}")
  groups = num_rows // group_size
  if num_prefixes % groups:
    raise ValueError(f"shared prefixes: {num_prefixes} prefixes are not the same number per group for {groups} groups")


def forward_with_shared_prefixes(
    model: Transformer,
    prefix_tokens: Array,  # [C, Lc] int32, left-padded
    prefix_segments: Array,  # [C, Lc] int32, 0 = padding
    tokens: Array,  # [N, T] int32, right-padded
    segments: Array,  # [N, T] int32, 0 = padding
    prefix_of: Array,  # [N] int32 in [0, K): the row's prefix within its group
    *,
    group_size: int,
) -> SharedPrefixOutput:
  """See the module docstring. No KV cache is returned: this is a scoring forward."""
  check_layout(prefix_tokens.shape[0], tokens.shape[0], group_size)
  c, lc = prefix_tokens.shape
  t = tokens.shape[1]
  config = model.config
  inv_freq = rope_inverse_frequencies(config)
  prefix_positions = positions_from_segments(prefix_segments)
  prefix_slots = jnp.broadcast_to(jnp.arange(lc), prefix_segments.shape)
  row_prefix_lengths = within_groups(jnp.sum(prefix_segments != 0, axis=1), prefix_of, group_size)
  positions = row_prefix_lengths[:, None] + jnp.arange(t)[None, :]
  slots = jnp.broadcast_to(lc + jnp.arange(t), tokens.shape)
  kv_segments = jnp.concatenate([within_groups(prefix_segments, prefix_of, group_size), segments], axis=1)
  empty_kv = jnp.zeros((1, c, config.num_kv_heads, lc, config.head_dim), config.jnp_dtype)
  layer_def, layer_params = nnx.split(model.layers)

  def layer(carry, params):
    prefix_x, x = carry
    decoder_layer = nnx.merge(layer_def, params)
    # The prefix stream: causal self-attention; its keys/values land in a one-layer cache.
    prefix_x, prefix_kv = decoder_layer(
        prefix_x, prefix_positions, prefix_segments, prefix_slots, inv_freq,
        LayerCache(empty_kv, empty_kv, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)), prefix_segments,
        fresh_cache=True)
    # The suffix stream continues its prefix: slots [0, Lc) its prefix's keys, [Lc, Lc + T) its own.
    widen = lambda kv: jnp.pad(within_groups(kv[0], prefix_of, group_size), ((0, 0), (0, 0), (0, t), (0, 0)))[None]
    cache = LayerCache(widen(prefix_kv.keys), widen(prefix_kv.values), jnp.zeros((), jnp.int32),
                       jnp.asarray(lc, jnp.int32))
    x, _ = decoder_layer(x, positions, segments, slots, inv_freq, cache, kv_segments)
    return (prefix_x, x), None

  # Transformer._over_layers: a scan over the stacked layers, or the unrolled loop.
  prefix_x, x = model._over_layers(layer, (model.embed_tokens(prefix_tokens), model.embed_tokens(tokens)), layer_params)
  prefix_last = model.norm(prefix_x[:, -1])
  return SharedPrefixOutput(suffix_hidden=model.norm(x),
                            prefix_last_hidden=within_groups(prefix_last, prefix_of, group_size))
