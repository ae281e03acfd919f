"""Examples through TFDS: a JSONL file prepared as array_record, read without TensorFlow.

`prepare_jsonl_dataset(jsonl_path, data_dir)` builds a `tfds.core.GeneratorBasedBuilder`
whose one split, "train", holds the JSONL rows (schema: `mopd_jax.tasks.jsonl`) in file
order, stored with `file_format="array_record"`. `tfds_examples(...)` reads this process's
share of the split through `as_data_source()` (random access, no TensorFlow import), split
across JAX processes with `tfds.split_for_jax_process`, and yields Examples.

The builder config is named after the file and a hash of its bytes, so editing the JSONL
prepares a new version instead of silently reusing the old one. Prepare once (e.g. on
process 0, or before launching) when several processes share `data_dir`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mopd_jax.tasks import PromptFormat, register_task
from mopd_jax.tasks.jsonl import example_from_row, read_jsonl_rows
from mopd_jax.types import Example


class MopdJsonlExamples(tfds.core.GeneratorBasedBuilder):
  """JSONL rows as a TFDS dataset: features `index` (row number) and `row` (JSON text)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JSONL rows stored as JSON text."}
  # tfds looks next to the builder's code for download checksums (a local file has none);
  # resolving that path for a module of an installed package needs `importlib_resources`,
  # which tfds does not declare. No code path: no checksums, no such import.
  code_path = None

  def __init__(self, *, jsonl_path: str | pathlib.Path, **kwargs: Any):
    self._jsonl_path = pathlib.Path(jsonl_path)
    config = tfds.core.BuilderConfig(name=_config_name(self._jsonl_path),
                                     description=f"rows of {self._jsonl_path.name}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not dataset_info_from_configs): that one looks for metadata files
    # next to the builder's module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="mopd_jax examples from a JSONL file (schema: mopd_jax.tasks.jsonl)",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "row": tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep the file's order: runs are reproducible by index
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Local file: nothing to download.
    return {"train": self._generate_examples(self._jsonl_path)}

  def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, row in enumerate(read_jsonl_rows(path)):
      yield index, {"index": index, "row": json.dumps(row, sort_keys=True)}


def _config_name(path: pathlib.Path) -> str:
  digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
  stem = re.sub(r"[^a-z0-9_]", "_", path.stem.lower()) or "data"
  return f"{stem}_{digest}"


def prepare_jsonl_dataset(jsonl_path: str | pathlib.Path,
                          data_dir: str | pathlib.Path) -> MopdJsonlExamples:
  """The builder for `jsonl_path`, prepared under `data_dir` (reused when already there)."""
  builder = MopdJsonlExamples(jsonl_path=jsonl_path, data_dir=str(data_dir),
                              file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return builder


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@register_task("tfds")
def tfds_examples(jsonl_path: str | pathlib.Path, data_dir: str | pathlib.Path, *,
                  split: str = "train", process_index: int | None = None,
                  process_count: int | None = None,
                  prompt_format: PromptFormat | None = None,
                  verifier: str | None = None) -> Iterator[Example]:
  """This process's share of the prepared JSONL dataset, as Examples in file order.

  `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`
  (tfds's defaults); shares differ in size by at most one row (no row dropped).
  """
  builder = prepare_jsonl_dataset(jsonl_path, data_dir)
  shard = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
  source = builder.as_data_source(split=shard)
  stem = pathlib.Path(jsonl_path).stem
  for i in range(len(source)):
    record = source[i]
    yield example_from_row(json.loads(_text(record["row"])), index=int(record["index"]),
                           source=stem, prompt_format=prompt_format, verifier=verifier)
