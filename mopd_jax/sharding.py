"""Device mesh, logical-axis rules, and the shardings of params, batches and caches.

One rule table (`DEFAULT_RULES`, after MaxText's `logical_axis_rules`) maps every logical axis
name to a mesh axis (or None = replicated): the parameters' names, annotated in the model
(`layers`, `embed`, `vocab`, `mlp`, `q_heads`, `kv_heads`, `fused`, `head_dim`, `norm`), and the
activations' and caches' (`activation_batch`, `activation_length`, `activation_heads`,
`activation_head_dim`).
Batches shard their rows over `data` x `fsdp`, so each prompt's G rollouts, which are
consecutive rows, stay on one shard as long as the per-shard row count is a multiple of G
(checked by the callers that build batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated). FSDP shards the model dimension, tensor
# parallelism the "wide" dimensions (heads, MLP, vocabulary).
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    # Fused projections (ModelConfig.fused_projections) stack a kv head's queries, key and value,
    # or an mlp unit's gate and up, on this axis: never split, so each device holds whole groups.
    ("fused", None),
    ("head_dim", None),  # a head's features, whole on every device (RoPE mixes its two halves)
    ("norm", None),
    # The stacked layers' leading axis: each device holds its shard of every layer (a scan
    # slices one layer per iteration, so this axis is never split across devices).
    ("layers", None),
    # Activations, batches and KV caches: rows (rollouts) over data x fsdp, positions whole,
    # attention heads (q/k/v, the cache's kv heads) over tensor where they divide.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. -1 in one axis means "all remaining devices"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(config.shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {config}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes of {config}")
    shape[shape.index(-1)] = len(devices) // known
  if any(s < 1 for s in shape):
    raise ValueError(f"mesh: axis sizes must be >= 1, got {config}")
  size = math.prod(shape)
  if size > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {size} devices, only {len(devices)} available")
  grid = np.asarray(devices[:size]).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(logical: Sequence[Optional[str]], rules: Mapping[str, Optional[str]]) -> P:
  axes = []
  for name in logical:
    if name is None:
      axes.append(None)
      continue
    if name not in rules:
      raise ValueError(f"sharding: no rule for logical axis {name!r}; rules cover {sorted(rules)}")
    axes.append(rules[name])
  return P(*axes)


def _check_divides(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    parts = math.prod(mesh.shape[a] for a in names)
    if dim % parts:
      raise ValueError(
          f"sharding: {path} has shape {tuple(shape)}; dimension {dim} is not divisible by mesh "
          f"axes {names} of size {parts} (mesh {dict(mesh.shape)})")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """NamedSharding for every leaf of a params state (abstract or concrete).

  Fails early, naming the parameter, when a mesh axis does not divide its dimension.
  """
  rules = dict(rules)
  logical = nnx.get_partition_spec(state)

  def leaf_sharding(path, spec_leaf, value_leaf):
    spec = spec_leaf.value if isinstance(spec_leaf, nnx.Variable) else spec_leaf
    value = value_leaf.value if isinstance(value_leaf, nnx.Variable) else value_leaf
    names = tuple(spec) if isinstance(spec, P) else (None,) * len(value.shape)
    mesh_spec = logical_to_mesh_spec(names, rules)
    _check_divides(_path_str(path), value.shape, mesh_spec, mesh)
    return NamedSharding(mesh, mesh_spec)

  is_leaf = lambda x: isinstance(x, nnx.Variable)
  # Same structure as `state` (Variables wrapping shardings), so the result zips with the
  # state in tree maps as well as serving as jit/device_put shardings.
  return jax.tree_util.tree_map_with_path(
      lambda path, s, v: _rewrap(v, leaf_sharding(path, s, v)), logical, state, is_leaf=is_leaf)


def _rewrap(leaf, value):
  return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value


def shard_params(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  return jax.device_put(state, param_shardings(state, mesh, rules))


def rule(name: str, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes of logical axis `name` in `rules` (empty: replicated)."""
  axes = logical_to_mesh_spec((name,), dict(rules))[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_spec(ndim: int = 2, rules=DEFAULT_RULES) -> P:
  """Leading (row) dimension by `activation_batch`, the rest replicated."""
  return logical_to_mesh_spec(("activation_batch",) + (None,) * (ndim - 1), dict(rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(rows: int, mesh: Mesh, what: str = "batch") -> None:
  shards = num_batch_shards(mesh)
  if rows % shards:
    raise ValueError(f"{what}: {rows} rows are not divisible by the data x fsdp mesh size {shards}")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Place host arrays with rows over data x fsdp (single-process)."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)


def heads_axis(mesh: Mesh, *head_counts: int, rules=DEFAULT_RULES):
  """`activation_heads`' mesh axis where it divides every head count (else None: replicated,
  every device computes all heads: correct, only redundant)."""
  axes = rule("activation_heads", rules)
  if not axes or any(a not in mesh.axis_names for a in axes):
    return None
  size = math.prod(mesh.shape[a] for a in axes)
  return (axes[0] if len(axes) == 1 else axes) if all(n % size == 0 for n in head_counts) else None


def cache_sharding(mesh: Mesh, num_kv_heads: int, rules=DEFAULT_RULES) -> NamedSharding:
  """KV cache [L, B, KVH, S, D] by the rules: layers, rows, kv heads (where they divide),
  positions, head dim."""
  layers, rows, _, length, dim = logical_to_mesh_spec(
      ("layers", "activation_batch", "activation_heads", "activation_length", "activation_head_dim"), dict(rules))
  return NamedSharding(mesh, P(layers, rows, heads_axis(mesh, num_kv_heads, rules=rules), length, dim))


def constrain(x: jax.Array, mesh: Optional[Mesh], spec: Optional[NamedSharding] = None) -> jax.Array:
  """Inside jit: rows over data x fsdp (or `spec`); a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec or batch_sharding(mesh, x.ndim))


def constrain_cache(cache: Any, mesh: Optional[Mesh], num_kv_heads: int) -> Any:
  """Inside jit: a KVCache's keys/values by `cache_sharding`, its segment ids like the batch."""
  if mesh is None:
    return cache
  kv = cache_sharding(mesh, num_kv_heads)
  return cache.replace(
      keys=constrain(cache.keys, mesh, kv), values=constrain(cache.values, mesh, kv),
      segment_ids=constrain(cache.segment_ids, mesh))


SAMPLING_LAYOUTS = ("train", "no_fsdp")


def sampling_rules(layout: str, rules=DEFAULT_RULES) -> tuple[tuple[str, Optional[str]], ...]:
  """Logical-axis rules of the sampler's copy of the params.

  "train": the training layout itself (no copy; inside each step XLA gathers what fsdp split).
  "no_fsdp": fsdp gathered, tensor parallelism kept: one all-gather per sampling call instead of
  per decode step, at the cost of a copy of each tensor-parallel shard on every chip.
  """
  if layout not in SAMPLING_LAYOUTS:
    raise ValueError(f"sampling layout must be one of {SAMPLING_LAYOUTS}, got {layout!r}")
  if layout == "train":
    return tuple(rules)
  return tuple((name, None if axis == "fsdp" else axis) for name, axis in rules)


@contextlib.contextmanager
def activation_mesh(mesh: Optional[Mesh]):
  """Trace model code under `mesh` as JAX's abstract-mesh context (usable inside jit).

  Kernels that must run per device (Pallas splash attention: Mosaic calls cannot be
  partitioned by XLA) read it to wrap themselves in `shard_map`. A no-op without a mesh.
  """
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield
