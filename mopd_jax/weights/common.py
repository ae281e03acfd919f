"""What the HF and GGUF importers share: our parameter paths, placement, and model assembly.

A parameter is addressed by its path in `nnx.state(model, nnx.Param)`, e.g.
`("layers", 3, "self_attn", "q_proj", "kernel")`. Each importer maps a path to a tensor
in its file format and returns that tensor in *our* layout ([in, out] kernels); this
module builds the model abstractly, asks for one tensor at a time and places it straight
into its target sharding, so a device only ever receives its own slice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mopd_jax.models.transformer import Transformer

ParamPath = tuple[Any, ...]  # str and int keys
# (index into our-layout array: a tuple of slices) -> numpy array of that slice
SliceReader = Callable[[tuple[slice, ...]], np.ndarray]


def path_str(path: ParamPath) -> str:
  return ".".join(str(k) for k in path)


def flat_params(model: Transformer) -> list[tuple[ParamPath, nnx.Variable]]:
  """(path, Param variable) for every parameter, in a stable order."""
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def flat_shardings(tree: Any) -> dict[ParamPath, jax.sharding.Sharding]:
  """Path -> sharding for a tree shaped like `nnx.state(model, nnx.Param)`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  out = {}
  for path, sharding in leaves:
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    if keys and keys[-1] == "value":  # a Variable wrapping the sharding
      keys = keys[:-1]
    out[keys] = sharding
  return out


def target_shardings(
    abstract: Transformer, mesh: Optional[jax.sharding.Mesh], rules: Optional[Sequence] = None,
) -> dict[ParamPath, jax.sharding.Sharding]:
  """Where each parameter goes: the mesh's rule-based shardings, or the default device."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {path: device for path, _ in flat_params(abstract)}
  from mopd_jax import sharding as shd

  state = nnx.state(abstract, nnx.Param)
  return flat_shardings(shd.param_shardings(state, mesh, shd.DEFAULT_RULES if rules is None else rules))


def place(
    read: SliceReader, shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding,
) -> jax.Array:
  """A global array whose per-device slices come from `read`, converted to `dtype` on host.

  Replicated slices are read once (cached by index) and shared by the devices needing them.
  """
  dtype = jnp.dtype(dtype)
  cache: dict[tuple, np.ndarray] = {}

  def fetch(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))  # normalise None bounds
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      # An owned copy: `read` may return a view of a memory-mapped file closed after loading.
      cache[key] = np.array(read(index), dtype=dtype, order="C", copy=True)
    return cache[key]

  return jax.make_array_from_callback(shape, sharding, fetch)


def assemble(
    abstract: Transformer,
    load_param: Callable[[ParamPath, tuple[int, ...], Any, jax.sharding.Sharding], jax.Array],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
) -> Transformer:
  """Fill an abstract model (from `abstract_model`, no memory) parameter by parameter.

  `load_param(path, shape, dtype, sharding)` returns each parameter already placed.
  """
  dtype = abstract.config.jnp_param_dtype
  shardings = target_shardings(abstract, mesh, rules)
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  for path, var in params:
    var.set_value(load_param(path, tuple(var.get_value().shape), dtype, shardings[path]))
  nnx.update(abstract, nnx.from_flat_state(params))
  return abstract
