"""Published parameter counts from abstract shapes alone (nothing allocated)."""

import jax
import numpy as np
import pytest
from flax import nnx

from mopd_jax.models import abstract_model, get_preset


@pytest.mark.parametrize("name,published", [("qwen3-8b", 8_190_735_360), ("qwen3-14b", 14_768_307_200)])
def test_qwen3_parameter_counts(name, published):
  config = get_preset(name)
  params = nnx.state(abstract_model(config), nnx.Param)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # shapes only, no buffers
  assert sum(int(np.prod(x.shape)) for x in leaves) == published == config.num_params()
