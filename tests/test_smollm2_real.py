"""SmolLM2-135M-Instruct from its real GGUF (Q4_1): logits and greedy text equal transformers'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mopd_jax.chat import greedy_generate  # noqa: E402
from mopd_jax.models import positions_from_segments  # noqa: E402
from mopd_jax.weights import load_pretrained, relayout, smollm2_gguf_path  # noqa: E402
from mopd_jax.weights import loading as model_loading  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a haiku about the sea."}]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 GGUF absent: {e}")


@pytest.fixture(scope="module")
def ours(gguf_path):
  return load_pretrained(gguf_path)  # float32


@pytest.fixture(scope="module")
def reference(gguf_path):
  # transformers' own GGUF loader (needs `accelerate`): dequantises to float32.
  model = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
  return model, tokenizer


def test_config_and_prompt_tokens(ours, reference):
  model, tok = ours
  hf, hf_tok = reference
  c = model.config
  assert (c.family, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
      "llama", 49152, 576, 30, 9, 3, 64)
  assert c.tie_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
  expected = hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert tok.apply_chat_template(PROMPT) == list(expected)


def test_logits_match_transformers(ours, reference):
  model, tok = ours
  hf, _ = reference
  ids = tok.apply_chat_template(PROMPT)
  _assert_logits_match(model, hf, ids)


def _assert_logits_match(model, hf, ids) -> None:
  """Our logits on one token list within 1e-3 of transformers'."""
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor([ids])).logits.numpy()
  tokens = jnp.asarray([ids])
  seg = jnp.ones_like(tokens)
  logits = np.asarray(model(tokens, positions_from_segments(seg), seg).logits)
  assert np.abs(logits - expected).max() <= 1e-3


def _naive_greedy(model, prompt, steps):
  """Full forward recomputation each step over a fixed right-padded buffer (one compile)."""
  graphdef, state = nnx.split(model)
  width = len(prompt) + steps

  @jax.jit
  def next_token(state, tokens, length):
    m = nnx.merge(graphdef, state)
    seg = (jnp.arange(width) < length).astype(jnp.int32)[None]
    logits = m(tokens, positions_from_segments(seg), seg).logits
    return jnp.argmax(logits[0, length - 1])

  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  for k in range(steps):
    n = len(prompt) + k
    tokens[0, n] = int(next_token(state, jnp.asarray(tokens), n))
  return tokens[0, len(prompt):].tolist()


def test_greedy_continuation_matches_transformers(ours, reference):
  model, tok = ours
  hf, _ = reference
  ids = tok.apply_chat_template(PROMPT)
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=NEW_TOKENS, do_sample=False)
  expected = out[0, len(ids):].tolist()
  assert len(expected) == NEW_TOKENS  # this prompt's answer is longer than 20 tokens
  assert _naive_greedy(model, ids, NEW_TOKENS) == expected
  # The KV-cached decoder behind `python -m mopd_jax.chat` agrees too.
  [cached] = greedy_generate(model, [ids], max_new_tokens=NEW_TOKENS, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
  assert cached == expected
  print("reply:", tok.decode(expected))


def test_fused_and_separate_projections_give_the_same_greedy_rollouts(ours):
  model, tok = ours
  assert model.config.fused_projections
  unfused = relayout(model, model.config.replace(fused_projections=False))
  # The run's path: config.model.fused_projections=False reaches the loader as a compute option.
  loaded, _ = model_loading.load_model_and_tokenizer("smollm2-135m", "smollm2-gguf", "", "float32", "float32", 0,
                                                     fused_projections=False)
  assert not loaded.config.fused_projections
  jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param), nnx.state(unfused, nnx.Param))
  prompts = [tok.apply_chat_template(PROMPT),
             tok.apply_chat_template([{"role": "user", "content": "What is 12 + 34? Answer briefly."}])]
  options = dict(max_new_tokens=NEW_TOKENS, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
  assert greedy_generate(model, prompts, **options) == greedy_generate(unfused, prompts, **options)


def test_hf_export_of_gguf_model_loads_in_transformers(ours, tmp_path):
  from mopd_jax.weights import save_hf_checkpoint

  model, tok = ours
  save_hf_checkpoint(model, tmp_path, tokenizer=tok)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert hf.generation_config.eos_token_id == 2 and hf.generation_config.pad_token_id == 2
  ids = hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert list(ids) == tok.apply_chat_template(PROMPT)
  _assert_logits_match(model, hf, ids)
