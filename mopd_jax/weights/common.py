"""What the HF and GGUF importers share: our parameter paths, placement, and model assembly.

A parameter is addressed by its path in `nnx.state(model, nnx.Param)`. The decoder layers
are stacked: `("layers", "mlp", "down_proj", "kernel")` is one [L, in, out] array, while
checkpoint files hold one tensor per layer. Importers and exporters therefore see *file
tensors* (`FileTensor`), named by *file paths*: a stacked parameter becomes L paths
`("layers", i, "mlp", ...)` of the per-layer shape. Each importer maps a file path to a reader
of its tensor in *our* orientation ([in, out] kernels); this module builds the model abstractly,
stacks the per-layer readers, and places each parameter straight into its target sharding,
reading only the slices (layers included) that each device holds.

Fused projections (`ModelConfig.fused_projections`): files keep Hugging Face's separate q/k/v
and gate/up tensors, and file paths keep their names (`self_attn.q_proj`, `mlp.up_proj`, ...);
one fused parameter holds several of them side by side along its axis -2 (`FUSED`), each file
tensor's last axis unflattened into the parameter's trailing axes:

    qkv_proj.kernel [E, KVH, G + 2, D] = q [E, KVH*G*D] -> [E, KVH, G, D] | k, v [E, KVH*D] -> [E, KVH, 1, D]
    qkv_proj.bias   [KVH, G + 2, D]   = the same, without E (Qwen2.5)
    gate_up_proj.kernel [E, 2, M]     = gate [E, M] -> [E, 1, M] | up [E, M] -> [E, 1, M]

(G = num_heads / num_kv_heads; query head h = kv head h // G, as in HF.) Import reads each
device's slice of a fused parameter from the slices of its file tensors; export cuts them out
again. Both only move values, so a round trip is bit-exact in either layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mopd_jax.models.config import ModelConfig
from mopd_jax.models.transformer import Transformer, abstract_model

ParamPath = tuple[Any, ...]  # str and int keys
# (index into our-layout array: a tuple of slices) -> numpy array of that slice
SliceReader = Callable[[tuple[slice, ...]], np.ndarray]
STACKED = "layers"  # parameters under this key carry a leading [num_layers] axis


@dataclasses.dataclass(frozen=True)
class FileTensor:
  """One tensor of a checkpoint file, and where it lives among our parameters."""

  file_path: ParamPath  # ("layers", i, "self_attn", "q_proj", "kernel"): separate projections, layer numbered
  param_path: ParamPath  # the parameter holding it: ("layers", "self_attn", "qkv_proj", "kernel")
  layer: Optional[int]  # its layer in a stacked parameter
  shape: tuple[int, ...]  # in our orientation ([in, out] kernels)
  slots: Optional[slice] = None  # the part of a fused parameter's axis -2 it fills; None: all of the parameter


@dataclasses.dataclass(frozen=True)
class _Fused:
  """How one fused module holds file tensors (module docstring)."""

  parts: tuple[tuple[tuple[str, str], int], ...]  # (module of each file tensor, its slots on axis -2), in order
  out_axes: int  # our trailing axes a file tensor's last (output) axis unflattens into


def _fused_modules(config: ModelConfig) -> dict[tuple[str, str], _Fused]:
  g = config.num_heads // config.num_kv_heads
  return {
      ("self_attn", "qkv_proj"): _Fused(
          ((("self_attn", "q_proj"), g), (("self_attn", "k_proj"), 1), (("self_attn", "v_proj"), 1)), out_axes=3),
      ("mlp", "gate_up_proj"): _Fused(((("mlp", "gate_proj"), 1), (("mlp", "up_proj"), 1)), out_axes=2),
  }


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


def _parts(path: ParamPath, shape: tuple[int, ...], config: ModelConfig
           ) -> list[tuple[ParamPath, Optional[slice], tuple[int, ...]]]:
  """(file path without layer, slots, per-file shape) of each file tensor in a stacked parameter
  of per-layer `shape`: the parameter itself, or the parts of a fused one."""
  fused = _fused_modules(config).get(tuple(path[1:-1]))
  if fused is None:
    return [(path, None, shape)]
  lead, out = shape[:-fused.out_axes], shape[-fused.out_axes:]
  per_slot = int(np.prod(out)) // shape[-2]
  result, start = [], 0
  for module, slots in fused.parts:
    result.append(((path[0],) + module + (path[-1],), slice(start, start + slots), lead + (per_slot * slots,)))
    start += slots
  return result


def file_params(model: Transformer) -> list[FileTensor]:
  """Every tensor a checkpoint file holds, grouped by parameter (a stacked parameter's layers
  are consecutive, and a fused parameter's parts within each layer)."""
  out = []
  for path, var in flat_params(model):
    shape = tuple(var.get_value().shape)
    if not is_stacked(path):
      out.append(FileTensor(path, path, None, shape))
      continue
    for i in range(shape[0]):
      out += [FileTensor(layer_path(file_path, i), path, i, file_shape, slots)
              for file_path, slots, file_shape in _parts(path, shape[1:], model.config)]
  return out


def file_tensor(param: np.ndarray, tensor: FileTensor) -> np.ndarray:
  """The file tensor (our orientation) in `param`, this tensor's layer of its parameter."""
  if tensor.slots is None:
    return param
  return param[..., tensor.slots, :].reshape(tensor.shape)


def _block_offsets(dims: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
  """Flat offsets (C order) of the block `index` selects in an array of shape `dims`."""
  return np.ravel_multi_index(np.ix_(*(np.arange(n)[s] for n, s in zip(dims, index))), dims)


def fused_reader(parts: Sequence[tuple[SliceReader, FileTensor]], shape: tuple[int, ...]) -> SliceReader:
  """A reader of one layer of a fused parameter (per-layer `shape`) from readers of its file tensors.

  Each part is read as the smallest range of its last axis that covers the block asked for, then
  cut to the block: a device holding some kv heads (or mlp units) reads only theirs.
  """
  def read(index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))  # steps are 1: shards are blocks
    pieces = []
    for read_part, tensor in parts:
      first, stop = max(index[-2].start, tensor.slots.start), min(index[-2].stop, tensor.slots.stop)
      if first >= stop:
        continue
      lead = len(tensor.shape) - 1  # the file tensor's leading axes are ours; its last spans the rest
      dims = shape[lead:-2] + (tensor.slots.stop - tensor.slots.start, shape[-1])
      local = slice(first - tensor.slots.start, stop - tensor.slots.start)
      offsets = _block_offsets(dims, index[lead:-2] + (local, index[-1]))
      lo, hi = int(offsets.min()), int(offsets.max()) + 1
      pieces.append(np.asarray(read_part(index[:lead] + (slice(lo, hi),)))[..., offsets - lo])
    return np.concatenate(pieces, axis=-2)
  return read


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
  tensors: dict[tuple[ParamPath, Optional[int]], list[FileTensor]] = {}
  for t in file_params(abstract):
    tensors.setdefault((t.param_path, t.layer), []).append(t)

  def layer_reader(path: ParamPath, layer: Optional[int], shape: tuple[int, ...]) -> SliceReader:
    parts = tensors[(path, layer)]
    if parts[0].slots is None:
      return reader(parts[0].file_path, parts[0].shape)
    return fused_reader([(reader(t.file_path, t.shape), t) for t in parts], shape)

  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  for path, var in params:
    shape = tuple(var.get_value().shape)
    if is_stacked(path):
      read = stacked_reader([layer_reader(path, i, shape[1:]) for i in range(shape[0])])
    else:
      read = layer_reader(path, None, shape)
    var.set_value(place(read, shape, dtype, shardings[path]))
  nnx.update(abstract, nnx.from_flat_state(params))
  return abstract


def relayout(
    model: Transformer, config: ModelConfig, *, mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
) -> Transformer:
  """The model's weights in the parameters of `config`, the same architecture in another layout
  (e.g. `fused_projections` switched): through the file tensors, so every value is kept exactly.
  Placed on `mesh` by `rules`, or on the default device."""
  source = {t.file_path: t for t in file_params(model)}
  target = abstract_model(config)
  wanted = {t.file_path: t.shape for t in file_params(target)}
  if wanted != {path: t.shape for path, t in source.items()}:
    raise ValueError("relayout: the config describes another architecture than the model's (its file tensors differ)")
  values = dict(flat_params(model))

  def reader(file_path: ParamPath, shape: tuple[int, ...]) -> SliceReader:
    t = source[file_path]
    param = values[t.param_path].get_value()
    layer = param if t.layer is None else param[t.layer]
    return lambda index: file_tensor(np.asarray(jax.device_get(layer)), t)[index]

  return assemble(target, reader, mesh=mesh, rules=rules)
