"""What the HF and GGUF importers share: our parameter paths, placement, and model assembly.

A parameter is addressed by its path in `nnx.state(model, nnx.Param)`. The decoder layers
are stacked: `("layers", "self_attn", "q_proj", "kernel")` is one [L, in, out] array, while
checkpoint files hold one tensor per layer. Importers and exporters therefore see *file
paths*, where a stacked parameter becomes L paths `("layers", i, "self_attn", ...)` of the
per-layer shape. Each importer maps a file path to a reader of its tensor in *our* layout
([in, out] kernels); this module builds the model abstractly, stacks the per-layer readers,
and places each parameter straight into its target sharding, reading only the slices (layers
included) that each device holds.
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
STACKED = "layers"  # parameters under this key carry a leading [num_layers] axis


def path_str(path: ParamPath) -> str:
  return ".".join(str(k) for k in path)


def flat_params(model: Transformer) -> list[tuple[ParamPath, nnx.Variable]]:
  """(path, Param variable) for every parameter, in a stable order."""
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def is_stacked(path: ParamPath) -> bool:
  return bool(path) and path[0] == STACKED


def layer_path(path: ParamPath, layer: int) -> ParamPath:
  """The file path of one layer of a stacked parameter."""
  return (path[0], layer) + tuple(path[1:])


def file_params(model: Transformer) -> list[tuple[ParamPath, ParamPath, Optional[int], tuple[int, ...]]]:
  """(file path, parameter path, layer or None, per-file shape) for every tensor a checkpoint
  file holds, grouped by parameter (a stacked parameter's layers are consecutive)."""
  out = []
  for path, var in flat_params(model):
    shape = tuple(var.get_value().shape)
    if is_stacked(path):
      out += [(layer_path(path, i), path, i, shape[1:]) for i in range(shape[0])]
    else:
      out.append((path, path, None, shape))
  return out


def stacked_reader(layers: Sequence[SliceReader]) -> SliceReader:
  """A reader of the [L, ...] stack of per-layer readers: only the layers in the index are read."""
  def read(index: tuple[slice, ...]) -> np.ndarray:
    chosen = range(len(layers))[index[0]]
    return np.stack([layers[i](tuple(index[1:])) for i in chosen])
  return read


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
    reader: Callable[[ParamPath, tuple[int, ...]], SliceReader],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
) -> Transformer:
  """Fill an abstract model (from `abstract_model`, no memory) parameter by parameter.

  `reader(file_path, shape)` returns a SliceReader of one file tensor (see `file_params`), in
  our layout and per-layer shape; stacked parameters read each layer through it.
  """
  dtype = abstract.config.jnp_param_dtype
  shardings = target_shardings(abstract, mesh, rules)
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  for path, var in params:
    shape = tuple(var.get_value().shape)
    if is_stacked(path):
      read = stacked_reader([reader(layer_path(path, i), shape[1:]) for i in range(shape[0])])
    else:
      read = reader(path, shape)
    var.set_value(place(read, shape, dtype, shardings[path]))
  nnx.update(abstract, nnx.from_flat_state(params))
  return abstract
