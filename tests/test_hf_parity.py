"""HF checkpoint import/export: logits equal transformers' PyTorch models, round trips are exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mopd_jax import sharding  # noqa: E402
from mopd_jax.models import RopeScaling, positions_from_segments, tiny_config  # noqa: E402
from mopd_jax.weights import (  # noqa: E402
    CheckpointError, config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint)

FAMILIES = ["llama", "qwen2", "qwen3"]
_LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def _hf_model(family: str, seed: int = 0, kv_heads: int = 2):
  common = dict(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=kv_heads, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512)
  torch.manual_seed(seed)
  if family == "llama":  # untied, with Llama-3 RoPE scaling
    cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=_LLAMA3, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
  elif family == "qwen2":  # tied, qkv bias
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
  else:  # qk-norm, untied
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, tie_word_embeddings=False))
  with torch.no_grad():  # norms are ones at init: make them matter
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _batch():
  """Two rows of different lengths: row 0 left-padded by 3, row 1 right-padded by 2."""
  tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
  mask = np.ones((2, 12), np.int64)
  mask[0, :3] = 0
  mask[1, 10:] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


def _our_logits(model, tokens, mask):
  seg = jnp.asarray(mask, jnp.int32)
  return np.asarray(model(jnp.asarray(tokens), positions_from_segments(seg), seg).logits)


def _max_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=FAMILIES)
def hf_checkpoint(request, tmp_path_factory):
  family = request.param
  model = _hf_model(family)
  single = tmp_path_factory.mktemp(f"{family}_single")
  model.save_pretrained(single)
  sharded = tmp_path_factory.mktemp(f"{family}_sharded")
  model.save_pretrained(sharded, max_shard_size="40KB")
  return family, model, single, sharded


def test_logits_match_transformers_single_and_sharded_files(hf_checkpoint):
  family, hf, single, sharded = hf_checkpoint
  assert (sharded / "model.safetensors.index.json").exists()
  assert len(list(sharded.glob("model-*.safetensors"))) > 1
  tokens, mask = _batch()
  expected = _hf_logits(hf, tokens, mask)
  for directory in (single, sharded):
    model = load_hf_checkpoint(directory)
    assert model.config.family == family
    assert _max_diff(_our_logits(model, tokens, mask), expected, mask) <= 1e-4


@pytest.mark.parametrize("fused,mesh_shape", [(True, (1, 4, 2)), (False, (1, 2, 4))])
def test_loaded_straight_into_mesh_shardings(hf_checkpoint, fused, mesh_shape):
  """Each device reads its slice. Fused, tensor parallelism splits whole kv heads (2 here), and a
  device's q/k/v kernel is its kv head's query heads, key and value; unfused, it splits widths."""
  _, hf, _, sharded = hf_checkpoint
  fsdp, tensor = mesh_shape[1:]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  config = config_from_hf(json.loads((sharded / "config.json").read_text())).replace(fused_projections=fused)
  model = load_hf_checkpoint(sharded, mesh=mesh, config=config)
  P = jax.sharding.PartitionSpec
  if fused:
    kernel = model.layers.mlp.gate_up_proj.kernel.get_value()  # [layers, embed, 2, mlp]
    assert kernel.sharding.spec == P(None, "fsdp", None, "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 64 // fsdp, 2, 128 // tensor)
    qkv = model.layers.self_attn.qkv_proj.kernel.get_value()  # [layers, embed, kv heads, 2 + 2, head dim]
    assert qkv.sharding.spec == P(None, "fsdp", "tensor", None, None)
    weights = {k: v.numpy() for k, v in hf.state_dict().items()}
    for shard in qkv.addressable_shards:
      (j,) = range(2)[shard.index[2]]  # one kv head per device
      rows = [weights[f"model.layers.1.self_attn.{p}_proj.weight"][16 * h:16 * h + 16]
              for p, h in (("q", 2 * j), ("q", 2 * j + 1), ("k", j), ("v", j))]
      np.testing.assert_array_equal(np.asarray(shard.data[1, :, 0]), np.stack(rows, 1).T[shard.index[1]])
  else:
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # [layers, embed, mlp]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 64 // fsdp, 128 // tensor)
  tokens, mask = _batch()
  assert _max_diff(_our_logits(model, tokens, mask), _hf_logits(hf, tokens, mask), mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_import_then_export_gives_the_original_tensors_fused_or_not(family, kv_heads, tmp_path):
  """HF's separate q/k/v and gate/up tensors come back bit for bit from the fused layout, and
  the fused and unfused models of one file compute the same logits."""
  from safetensors.numpy import load_file

  hf = _hf_model(family, seed=1, kv_heads=kv_heads)
  hf.save_pretrained(tmp_path / "in")
  original = load_file(tmp_path / "in" / "model.safetensors")
  fused = load_hf_checkpoint(tmp_path / "in")
  assert fused.config.fused_projections and fused.config.num_kv_heads == kv_heads
  unfused = load_hf_checkpoint(tmp_path / "in", config=fused.config.replace(fused_projections=False))
  for model, name in ((fused, "fused"), (unfused, "unfused")):
    exported = load_file(save_hf_checkpoint(model, tmp_path / name) / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
      assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  tokens, mask = _batch()
  np.testing.assert_allclose(_our_logits(fused, tokens, mask), _our_logits(unfused, tokens, mask), atol=1e-5)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_export_then_import_is_bit_exact(hf_checkpoint, tmp_path, param_dtype):
  _, _, single, _ = hf_checkpoint
  model = load_hf_checkpoint(single, param_dtype=param_dtype)
  for max_shard_size, name in ((5 * 2**30, "one"), (30_000, "many")):
    out = save_hf_checkpoint(model, tmp_path / name, max_shard_size=max_shard_size)
    again = load_hf_checkpoint(out)
    assert again.config == model.config
    a = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    b = [np.asarray(x) for x in jax.tree.leaves(nnx.state(again, nnx.Param))]
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
  assert (tmp_path / "many" / "model.safetensors.index.json").exists()


def test_transformers_loads_our_export(hf_checkpoint, tmp_path):
  family, hf, single, _ = hf_checkpoint
  model = load_hf_checkpoint(single)
  save_hf_checkpoint(model, tmp_path, generation_config={"eos_token_id": 2, "bos_token_id": 1})
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert type(reloaded) is type(hf)
  assert reloaded.generation_config.eos_token_id == 2
  tokens, mask = _batch()
  assert _max_diff(_hf_logits(reloaded, tokens, mask), _hf_logits(hf, tokens, mask), mask) == 0.0
  assert _max_diff(_our_logits(model, tokens, mask), _hf_logits(reloaded, tokens, mask), mask) <= 1e-4


# --------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family):
  cfg = tiny_config(family)
  if family == "llama":
    cfg = cfg.replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 256))
  assert config_from_hf(config_to_hf(cfg)) == cfg


def test_config_reads_transformers5_rope_parameters_and_legacy_rope_scaling():
  hf = _hf_model("llama").config.to_dict()  # transformers 5 writes rope_parameters
  cfg = config_from_hf(hf)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 64)
  legacy = dict(hf, rope_theta=500000.0, rope_scaling={**_LLAMA3, "type": "llama3"})
  legacy.pop("rope_parameters", None)
  assert config_from_hf(legacy) == cfg
  assert config_from_hf(dict(hf, torch_dtype="bfloat16", dtype=None)).param_dtype == "bfloat16"


def test_unknown_architecture_is_named():
  hf = config_to_hf(tiny_config("llama"))
  with pytest.raises(ValueError, match="MistralForCausalLM"):
    config_from_hf(dict(hf, architectures=["MistralForCausalLM"]))
  with pytest.raises(ValueError, match="yarn"):
    config_from_hf(dict(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


# --------------------------------------------------------------------------------------------
# Bad checkpoints


@pytest.fixture()
def exported(tmp_path):
  model = load_hf_checkpoint(_save(_hf_model("qwen3"), tmp_path / "src"))
  return save_hf_checkpoint(model, tmp_path / "ckpt")


def _save(model, directory):
  model.save_pretrained(directory)
  return directory


def _edit_tensors(directory, edit):
  from safetensors.numpy import load_file, save_file
  file = directory / "model.safetensors"
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(exported):
  _edit_tensors(exported, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
  with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm\.weight \(16,\)"):
    load_hf_checkpoint(exported)


def test_unexpected_tensor_is_named(exported):
  _edit_tensors(exported, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.extra\.weight \(3,\)"):
    load_hf_checkpoint(exported)


def test_shape_mismatch_names_tensor_and_shapes(exported):
  config = json.loads((exported / "config.json").read_text())
  (exported / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
  with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\).*expects"):
    load_hf_checkpoint(exported)


def test_inv_freq_buffers_and_tied_lm_head_are_ignored(tmp_path):
  hf = _hf_model("qwen2")  # tied
  directory = _save(hf, tmp_path)

  def add(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"]
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)

  _edit_tensors(directory, add)
  tokens, mask = _batch()
  assert _max_diff(_our_logits(load_hf_checkpoint(directory), tokens, mask), _hf_logits(hf, tokens, mask), mask) <= 1e-4
