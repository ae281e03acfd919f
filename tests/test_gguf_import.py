"""GGUF import on tiny files written here the way llama.cpp's converter writes them."""

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mopd_jax.models import positions_from_segments  # noqa: E402
from mopd_jax.tokenizer import PRE_TOKENIZERS, tokenizer_from_gguf_metadata  # noqa: E402
from mopd_jax.weights import CheckpointError, load_gguf  # noqa: E402
from mopd_jax.weights.gguf import permute_rotary, unpermute_rotary  # noqa: E402

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _hf_model(family, kv_heads=2):
  common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=kv_heads, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
                tie_word_embeddings=family != "qwen3")
  torch.manual_seed(1)
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
  model = cls[1](cls[0](**common, rope_theta=20000.0)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _gguf_name(hf_name):
  if hf_name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf_name == "model.norm.weight":
    return "output_norm.weight"
  if hf_name == "lm_head.weight":
    return "output.weight"
  _, _, layer, rest = hf_name.split(".", 3)
  module, leaf = rest.rsplit(".", 1)
  return f"blk.{layer}.{_GGUF_NAMES[module]}.{leaf}"


def _write_gguf(model, family, path, quantize=()):
  cfg = model.config
  writer = gguf.GGUFWriter(str(path), family)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(20000.0)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_key_length(cfg.head_dim)
  writer.add_vocab_size(cfg.vocab_size)
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    w = tensor.numpy()
    if family == "llama" and ".q_proj." in name:  # what convert_hf_to_gguf does for llama
      w = permute_rotary(w, cfg.num_attention_heads)
    elif family == "llama" and ".k_proj." in name:
      w = permute_rotary(w, cfg.num_key_value_heads)
    gname = _gguf_name(name)
    if gname.split(".")[-2] in quantize:
      writer.add_tensor(gname, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(gname, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_rotary_permutation_inverts():
  w = np.arange(96 * 8, dtype=np.float32).reshape(96, 8)
  np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 3), 3), w)
  assert not np.array_equal(permute_rotary(w, 3), w)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_gguf_logits_match_transformers(family, tmp_path):
  hf = _hf_model(family)
  model = load_gguf(_write_gguf(hf, family, tmp_path / "m.gguf"))
  cfg = model.config
  assert (cfg.family, cfg.tie_embeddings, cfg.qkv_bias, cfg.qk_norm) == (
      family, family != "qwen3", family == "qwen2", family == "qwen3")
  assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 20000.0
  tokens = np.random.RandomState(0).randint(0, 96, (2, 10))
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  seg = jnp.ones(tokens.shape, jnp.int32)
  ours = np.asarray(model(jnp.asarray(tokens), positions_from_segments(seg), seg).logits)
  assert np.abs(ours - expected).max() <= 1e-4


def test_quantized_tensors_dequantize_exactly(tmp_path):
  hf = _hf_model("llama")
  model = load_gguf(_write_gguf(hf, "llama", tmp_path / "q.gguf", quantize=("ffn_up", "attn_q")))
  sd = hf.state_dict()
  q8 = gguf.GGMLQuantizationType.Q8_0
  roundtrip = lambda w: gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
  up = roundtrip(sd["model.layers.1.mlp.up_proj.weight"].numpy())
  gate_up = np.asarray(model.layers.mlp.gate_up_proj.kernel.get_value()[1])  # [embed, gate | up, mlp]
  np.testing.assert_array_equal(gate_up[:, 1], up.T)
  q = roundtrip(permute_rotary(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), 4))
  qkv = np.asarray(model.layers.self_attn.qkv_proj.kernel.get_value()[0])  # [embed, kv heads, 2 q + k + v, head dim]
  np.testing.assert_array_equal(qkv[:, :, :2].reshape(64, 64), unpermute_rotary(q, 4).T)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_gguf_export_gives_the_original_separate_tensors(family, kv_heads, tmp_path):
  """GGUF -> our fused layout -> HF export: every tensor equals the one the file was written
  from (q/k un-permuted for llama), bit for bit; the unfused layout holds the same weights."""
  from safetensors.numpy import load_file

  from mopd_jax.weights import relayout, save_hf_checkpoint

  hf = _hf_model(family, kv_heads)
  model = load_gguf(_write_gguf(hf, family, tmp_path / "m.gguf"))
  assert model.config.fused_projections
  unfused = relayout(model, model.config.replace(fused_projections=False))
  tied = model.config.tie_embeddings
  expected = {k: v.numpy() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
  for m, name in ((model, "fused"), (unfused, "unfused")):
    exported = load_file(save_hf_checkpoint(m, tmp_path / name) / "model.safetensors")
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
      assert np.array_equal(exported[key], value), key


def test_bfloat16_import(tmp_path):
  hf = _hf_model("qwen3")
  model = load_gguf(_write_gguf(hf, "qwen3", tmp_path / "m.gguf"), param_dtype="bfloat16")
  kernel = model.layers.self_attn.o_proj.kernel.get_value()[0]
  assert kernel.dtype == jnp.bfloat16
  expected = hf.state_dict()["model.layers.0.self_attn.o_proj.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected)


def test_missing_tensor_is_named(tmp_path):
  hf = _hf_model("qwen2")
  sd = hf.state_dict()
  del sd["model.layers.1.mlp.down_proj.weight"]

  class Stub:  # a model whose state_dict lacks one tensor
    config = hf.config

    def state_dict(self):
      return sd

  with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_down\.weight"):
    load_gguf(_write_gguf(Stub(), "qwen2", tmp_path / "m.gguf"))


# --------------------------------------------------------------------------------------------
# Tokenizer from metadata


def _tiny_vocab():
  from tokenizers.pre_tokenizers import ByteLevel
  alphabet = sorted(ByteLevel.alphabet())
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merges = ["Ġ t", "h e", "Ġt he", "1 2"]
  tokens = specials + alphabet + ["Ġt", "he", "Ġthe", "12"]
  types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
  return tokens, merges, types


def _meta(**extra):
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
          "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
          **extra}


def test_gguf_tokenizer_specials_digits_and_bos():
  tokens, merges, types = _tiny_vocab()
  tok = tokenizer_from_gguf_metadata(_meta(), tokens, merges, types)
  the, twelve = tokens.index("Ġthe"), tokens.index("12")
  ids = tok.encode("<|im_start|> the 12<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2 and the in ids
  assert twelve not in ids  # smollm pre-tokenizer: each digit alone, so the "1 2" merge never applies
  assert tok.decode(ids) == "<|im_start|> the 12<|im_end|>"
  assert tok.decode(ids, skip_special_tokens=True) == " the 12"
  assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 0)
  assert tok.special_ids == frozenset({0, 1, 2})
  assert tok.apply_chat_template([{"role": "user", "content": " the"}]) == [1, the, 2]
  assert tok.encode("the", add_special_tokens=True)[0] != 1  # add_bos_token absent: no BOS
  with_bos = tokenizer_from_gguf_metadata(
      _meta(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.pre": "gpt2",
               "tokenizer.ggml.eot_token_id": 0}), tokens, merges, types)
  assert with_bos.encode("12", add_special_tokens=True) == [1, twelve]
  assert with_bos.eos_ids == (2, 0)


def test_gguf_tokenizer_rejects_unknown_kinds():
  tokens, merges, types = _tiny_vocab()
  with pytest.raises(ValueError, match="'mystery'"):
    tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": "mystery"}), tokens, merges, types)
  with pytest.raises(ValueError, match="'llama'"):
    tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.model": "llama"}), tokens, merges, types)
  assert {"smollm", "llama-bpe", "qwen2", "gpt2"} <= set(PRE_TOKENIZERS)
