"""GGUF (llama.cpp) files: a cached memory-mapped reader and the scalar metadata.

Below both users of a GGUF file: the tokenizer (`tokenizer.load_gguf_tokenizer`, its
`tokenizer.ggml.*` metadata) and the weights (`weights.gguf`, the model config and tensors).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

PathLike = Union[str, os.PathLike]


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime: float):
  import gguf

  class Reader(gguf.GGUFReader):
    # The reader slices its buffer ~10^6 times while parsing a vocabulary; slices of an
    # `np.memmap` pay a Python-level __array_finalize__ each, a plain ndarray view of the
    # same mapping does not (2.5x faster open; tensors stay memory-mapped).
    @property
    def data(self):
      return self._data

    @data.setter
    def data(self, value):
      self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  del mtime  # part of the cache key only: a rewritten file is re-read
  return Reader(path)


def open_gguf(path: PathLike):
  """A (cached) `gguf.GGUFReader`; the file is memory-mapped, tensors are read on demand."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  return _reader(str(path.resolve()), path.stat().st_mtime)


def _f32(x: Any) -> Any:
  # Metadata floats are float32: use the shortest decimal that rounds to them (1e-05,
  # not 9.999999747378752e-06), i.e. the value the original config.json held.
  if isinstance(x, (float, np.floating)):
    return float(str(np.float32(x)))
  return x


def metadata(reader, skip_arrays: bool = True) -> dict[str, Any]:
  """Scalar (and short array) metadata by key; the vocabulary arrays are left out by default."""
  out = {}
  for key, field in reader.fields.items():
    if skip_arrays and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                               "tokenizer.ggml.scores"):
      continue
    out[key] = _f32(field.contents())
  return out
