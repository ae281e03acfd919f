"""The run's models and tokenizer from `config.model`: a checkpoint, or a preset at random init.

    model, tokenizer = load_model_and_tokenizer(m.preset, m.checkpoint, m.tokenizer, m.param_dtype,
                                                seed=0, mesh=mesh, **compute_options(m))

Used by the trainer's setup, `mopd_jax.evaluate` and (reading no file) `mopd_jax.aot`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from flax import nnx

from mopd_jax.fields import ConfigError
from mopd_jax.models import ModelConfig, get_preset, init_model
from mopd_jax.tokenizer import Tokenizer, load_gguf_tokenizer, load_tokenizer
from mopd_jax.weights import load_pretrained, relayout, smollm2_gguf_path


def compute_options(model_config, *, backward: bool = True) -> dict[str, Any]:
  """How the model computes, from `config.model`: its fields named like `ModelConfig` fields
  (dtype, remat, attention_chunk, attention_impl, and any later switch), param_dtype apart.
  Keyword arguments of `load_model_and_tokenizer` / `preset_model_config`: one mapping for
  the trainer and `mopd_jax.aot`. backward=False: a model never differentiated (no remat)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"param_dtype"}
  options = {k: model_config[k] for k in model_config if k in fields}
  if not backward:
    options["remat"] = False
  return options


def preset_model_config(preset: str, param_dtype: str, **compute: Any) -> ModelConfig:
  """A preset's architecture with the run's param dtype and `compute_options`; reads no file.

  With a checkpoint the architecture comes from the file instead, and a random-init run
  widens the vocabulary to its tokenizer's (`load_model_and_tokenizer`).
  """
  return get_preset(preset).replace(param_dtype=param_dtype, **compute)


def load_model_and_tokenizer(preset: str, checkpoint: str, tokenizer_path: str, param_dtype: str, dtype: str,
                             seed: int, mesh: Optional[jax.sharding.Mesh] = None, **compute: Any):
  """(model, tokenizer). checkpoint: HF dir, .gguf, "smollm2-gguf", or "" for random init.
  compute: ModelConfig fields saying how the model computes (remat, attention_impl, ...).
  mesh: checkpoint tensors are read straight into their shards (no full copy on one device)."""
  compute = dict(compute, dtype=dtype)
  if checkpoint:
    path = smollm2_gguf_path() if checkpoint == "smollm2-gguf" else checkpoint
    model, tokenizer = load_pretrained(path, mesh=mesh, param_dtype=param_dtype)
    wanted = model.config.replace(**compute)
    if wanted.fused_projections != model.config.fused_projections:
      # Another parameter layout (names and shapes): moved tensor by tensor, values exact.
      model = relayout(model, wanted, mesh=mesh)
    elif wanted != model.config:
      # How the model computes is a config switch; rebuild the graph with it, keep the params.
      graphdef, state = nnx.split(model)
      fresh = nnx.eval_shape(lambda: init_model(wanted))
      nnx.update(fresh, state)
      model = fresh
  else:
    cfg = preset_model_config(preset, param_dtype, **compute)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else load_gguf_tokenizer(smollm2_gguf_path())
    if cfg.vocab_size < tokenizer.vocab_size:
      cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    model = init_model(cfg, seed=seed)
  if tokenizer_path and checkpoint:
    tokenizer = load_tokenizer(tokenizer_path)
  return model, tokenizer


def check_same_tokenizer(student: Tokenizer, teacher: Tokenizer) -> None:
  probe = "MOPD tokenizer check: 12+34=46, café, \n\n```python\nprint('x')\n```"
  if (student.vocab_size != teacher.vocab_size or student.encode(probe) != teacher.encode(probe)
      or student.eos_ids != teacher.eos_ids):
    raise ConfigError(
        "config.teacher.external_checkpoint: the external teacher's tokenizer differs from the student's "
        f"(vocab {teacher.vocab_size} vs {student.vocab_size}); MOPD scores the student's tokens with the "
        "teacher, so both must share one tokenizer")
