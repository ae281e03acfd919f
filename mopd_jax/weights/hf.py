"""Hugging Face checkpoints: `config.json` + safetensors (single file or sharded) <-> our model.

Import reads one tensor at a time through `safetensors.safe_open` (memory-mapped) and places
it straight into its target sharding: each device receives only its slice, read from the
file by slice, so no process ever holds a whole model in host memory. Everything is checked
against the config before any tensor data is read: missing tensors, unexpected tensors and
shape mismatches fail with the tensor's name and both shapes.

Export writes `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`)
and, when known, `generation_config.json` and the tokenizer files, loadable by
`transformers.AutoModelForCausalLM.from_pretrained`. Export then import is bit-exact.

Layout: our kernels are [in, out], HF `nn.Linear.weight` is [out, in]; names otherwise
mirror HF (`model.layers.{i}.mlp.down_proj.weight` <-> layer i of our stacked
`layers.mlp.down_proj.kernel`, RMSNorm `weight` <-> `scale`, `model.embed_tokens.weight` <->
`embed_tokens.embedding`). With fused projections (the default), HF's q/k/v_proj and
gate/up_proj tensors of layer i are parts of layer i of our `self_attn.qkv_proj` and
`mlp.gate_up_proj` (`mopd_jax.weights.common`): import assembles them, export cuts them out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.models.config import ModelConfig, RopeScaling
from mopd_jax.models.transformer import Transformer, abstract_model
from mopd_jax.weights import common

PathLike = Union[str, os.PathLike]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF architecture name -> our family, plus HF per-class defaults for keys a config.json may omit.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}

# Tensors some checkpoints carry that carry no parameters of ours.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint that does not match the model its config describes."""


# --------------------------------------------------------------------------------------------
# config.json


def _architecture(hf: Mapping[str, Any]) -> str:
  archs = hf.get("architectures") or []
  if archs:
    name = archs[0]
    if name not in ARCHITECTURES:
      raise ValueError(f"config.json: unsupported architecture {name!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(
        f"config.json: unsupported model_type {model_type!r} (no 'architectures'); "
        f"supported: {sorted(_MODEL_TYPES)}")
  return model_type


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[RopeScaling]]:
  # transformers >= 5 writes `rope_parameters` (theta included); older files `rope_theta` +
  # `rope_scaling` (with "type" in the oldest ones).
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  spec = params if params.get("rope_type", "default") != "default" else scaling
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind != "llama3":
    raise ValueError(f"config.json: unsupported rope scaling type {kind!r}; supported: 'llama3'")
  return theta, RopeScaling(
      factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
      high_freq_factor=float(spec["high_freq_factor"]),
      original_max_position_embeddings=int(spec["original_max_position_embeddings"]))


def _checkpoint_dtype(hf: Mapping[str, Any]) -> str:
  name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
  return "bfloat16" if name in ("bfloat16", "float16") else "float32"


def config_from_hf(
    hf: Mapping[str, Any], *, param_dtype: Optional[str] = None, dtype: Optional[str] = None,
) -> ModelConfig:
  """ModelConfig from a parsed `config.json`. Dtypes default to the checkpoint's
  (bfloat16 for bf16/fp16 checkpoints, else float32); compute dtype defaults to param dtype."""
  family = _architecture(hf)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json: hidden_act {act!r} is not supported (SwiGLU with 'silu' only)")
  if hf.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported")
  if family in ("llama", "qwen3") and hf.get("attention_bias"):
    raise ValueError(f"config.json: attention_bias=true is not supported for {family}")
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported")
  theta, scaling = _rope(hf)
  heads = int(hf["num_attention_heads"])
  param_dtype = param_dtype or _checkpoint_dtype(hf)
  return ModelConfig(
      family=family,  # type: ignore[arg-type]
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=family == "qwen2",
      qk_norm=family == "qwen3",
      max_position_embeddings=int(hf.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[family]),
      param_dtype=param_dtype,
      dtype=dtype or param_dtype,
  )


def config_to_hf(config: ModelConfig, **extra: Any) -> dict[str, Any]:
  """A `config.json` dict transformers (4.x and 5.x) reads back into the same model."""
  hf: dict[str, Any] = {
      "architectures": [_MODEL_TYPES[config.family]],
      "model_type": config.family,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": config.param_dtype,
      "use_cache": True,
  }
  if config.rope_scaling is not None:
    s = config.rope_scaling
    hf["rope_scaling"] = {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
  if config.family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
    if config.family == "qwen3":
      hf.update(attention_bias=False)
  hf.update(extra)
  return hf


# --------------------------------------------------------------------------------------------
# Names


def hf_tensor_name(path: common.ParamPath) -> tuple[str, bool]:
  """HF name of one of our file tensors (`common.file_params`: layer parameters as
  `("layers", i, ...)`), and whether HF stores it transposed."""
  keys = [str(k) for k in path]
  leaf = keys[-1]
  if keys == ["embed_tokens", "embedding"]:
    return "model.embed_tokens.weight", False
  if keys == ["lm_head", "kernel"]:
    return "lm_head.weight", True
  if keys == ["norm", "scale"]:
    return "model.norm.weight", False
  if keys[0] != "layers" or leaf not in ("kernel", "bias", "scale"):
    raise KeyError(f"no HF name for parameter {common.path_str(path)}")
  suffix = {"kernel": "weight", "bias": "bias", "scale": "weight"}[leaf]
  return "model." + ".".join(keys[:-1]) + "." + suffix, leaf == "kernel"


def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
  return tuple(reversed(shape)) if transpose else shape


# --------------------------------------------------------------------------------------------
# Import


class _SafetensorsFiles:
  """The tensors of a checkpoint directory across its shard files, opened lazily."""

  def __init__(self, directory: Path, stack: contextlib.ExitStack):
    from safetensors import safe_open

    self._safe_open = safe_open
    self._stack = stack
    self._handles: dict[str, Any] = {}
    index = directory / INDEX_FILE
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.file_of = {name: directory / file for name, file in weight_map.items()}
    elif (directory / SINGLE_FILE).exists():
      names = self._handle(directory / SINGLE_FILE).keys()
      self.file_of = {name: directory / SINGLE_FILE for name in names}
    else:
      raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")

  def _handle(self, file: Path):
    key = str(file)
    if key not in self._handles:
      if not file.exists():
        raise FileNotFoundError(f"checkpoint shard {file} (named in {INDEX_FILE}) does not exist")
      self._handles[key] = self._stack.enter_context(self._safe_open(key, framework="numpy"))
    return self._handles[key]

  def slice(self, name: str):
    return self._handle(self.file_of[name]).get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.slice(name).get_shape())


def _check_tensors(
    files: _SafetensorsFiles, expected: Mapping[str, tuple[int, ...]], config: ModelConfig, where: Path,
) -> None:
  available = set(files.file_of)
  ignorable = {n for n in available if _IGNORED.search(n)}
  if config.tie_embeddings:
    ignorable.add("lm_head.weight")  # tied: HF drops it on load too
  missing = sorted(set(expected) - available)
  if missing:
    details = ", ".join(f"{n} {expected[n]}" for n in missing[:10])
    raise CheckpointError(
        f"{where}: {len(missing)} tensor(s) missing for the model config.json describes: {details}"
        + (" ..." if len(missing) > 10 else ""))
  unexpected = sorted(available - set(expected) - ignorable)
  if unexpected:
    details = ", ".join(f"{n} {files.shape(n)}" for n in unexpected[:10])
    raise CheckpointError(
        f"{where}: {len(unexpected)} unexpected tensor(s) not in the model config.json describes: {details}"
        + (" ..." if len(unexpected) > 10 else ""))
  for name, shape in expected.items():
    found = files.shape(name)
    if found != shape:
      raise CheckpointError(f"{where}: tensor {name} has shape {found}, the config expects {shape}")


def read_config(directory: PathLike) -> dict[str, Any]:
  path = Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no config.json")
  return json.loads(path.read_text())


def load_hf_checkpoint(
    directory: PathLike,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence] = None,
    param_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
    config: Optional[ModelConfig] = None,
) -> Transformer:
  """The model of an HF checkpoint directory, its params placed on `mesh` by `rules`
  (default: `sharding.DEFAULT_RULES`), or on the default device when `mesh` is None."""
  directory = Path(directory)
  if config is None:
    config = config_from_hf(read_config(directory), param_dtype=param_dtype, dtype=dtype)
  elif param_dtype or dtype:
    config = config.replace(param_dtype=param_dtype or config.param_dtype, dtype=dtype or config.dtype)
  abstract = abstract_model(config)
  names = {t.file_path: hf_tensor_name(t.file_path) + (t.shape,) for t in common.file_params(abstract)}
  expected = {name: _hf_shape(shape, t) for name, t, shape in names.values()}
  with contextlib.ExitStack() as stack:
    files = _SafetensorsFiles(directory, stack)
    _check_tensors(files, expected, config, directory)

    def reader(file_path, shape):
      name, transpose, _ = names[file_path]
      tensor = files.slice(name)

      def read(index):
        if transpose:  # our [in, out] slice = HF [out, in] slice, transposed
          return tensor[tuple(reversed(index))].T
        return tensor[index]

      return read

    return common.assemble(abstract, reader, mesh=mesh, rules=rules)


# --------------------------------------------------------------------------------------------
# Export


def _host_array(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: every process joins
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


class _OneParamOnHost:
  """Host copy of the parameter last asked for: a stacked parameter's layers are written one
  after another, so each parameter is gathered to the host once, and only one at a time."""

  def __init__(self, vars_by_path: Mapping[common.ParamPath, Any]):
    self._vars = vars_by_path
    self._path: Optional[common.ParamPath] = None
    self._array: Optional[np.ndarray] = None

  def get(self, path: common.ParamPath) -> np.ndarray:
    if path != self._path:
      self._path, self._array = path, None  # drop the previous one before gathering the next
      self._array = _host_array(self._vars[path].get_value())
    return self._array


def _shard_plan(
    entries: Sequence[tuple[str, Any, bool, tuple[int, ...], Any]], max_shard_size: int,
) -> list[list[int]]:
  shards: list[list[int]] = [[]]
  size = 0
  for k, (_, _, _, shape, dt) in enumerate(entries):
    nbytes = int(np.prod(shape)) * jnp.dtype(dt).itemsize
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(k)
    size += nbytes
  return shards


def save_hf_checkpoint(
    model: Transformer,
    directory: PathLike,
    *,
    tokenizer: Any = None,
    generation_config: Optional[Mapping[str, Any]] = None,
    max_shard_size: int = 5 * 2**30,
) -> Path:
  """Write an HF checkpoint directory; tensors keep their dtype (bit-exact round trip).

  With a tokenizer, its files are written too and generation_config.json gets its
  BOS/EOS/PAD ids (unless `generation_config` is given). Multi-host: call on every process
  (parameters are gathered); process 0 writes.
  """
  from safetensors.numpy import save_file

  directory = Path(directory)
  config: ModelConfig = model.config
  vars_by_path = dict(common.flat_params(model))
  entries = []
  for t in common.file_params(model):
    name, transpose = hf_tensor_name(t.file_path)
    entries.append((name, t, transpose, t.shape, vars_by_path[t.param_path].get_value().dtype))
  plan = _shard_plan(entries, max_shard_size)
  writer = jax.process_index() == 0
  if writer:
    directory.mkdir(parents=True, exist_ok=True)
  weight_map, total = {}, 0
  host = _OneParamOnHost(vars_by_path)
  for s, members in enumerate(plan):
    file = SINGLE_FILE if len(plan) == 1 else f"model-{s + 1:05d}-of-{len(plan):05d}.safetensors"
    tensors = {}
    for k in members:
      name, t, transpose, _, _ = entries[k]
      array = host.get(t.param_path)
      array = common.file_tensor(array if t.layer is None else array[t.layer], t)
      tensors[name] = np.ascontiguousarray(array.T if transpose else array)
      weight_map[name] = file
      total += tensors[name].nbytes
    if writer:
      save_file(tensors, str(directory / file), metadata={"format": "pt"})
    del tensors
  if not writer:
    return directory
  if len(plan) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

  special: dict[str, Any] = {}
  if tokenizer is not None:
    eos = list(tokenizer.eos_ids)
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": tokenizer.pad_id}
    if hasattr(tokenizer, "save_pretrained"):
      tokenizer.save_pretrained(directory)
  hf = config_to_hf(config, **special)
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if generation_config is None and special:
    generation_config = special
  if generation_config is not None:
    (directory / "generation_config.json").write_text(json.dumps(dict(generation_config), indent=2) + "\n")
  return directory
