"""Stand-ins shared by the host-loop tests: the real SmolLM2 tokenizer, and a `trainer.Run`-like
object around a fake `sampling.sample`, which is what `rollouts.sample_and_verify` reads."""

import types

import pytest

from mopd_jax import config_lib, rollouts, weights


def smollm2_tokenizer():
  try:
    return weights.load_gguf_tokenizer(weights.smollm2_gguf_path())
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 GGUF absent: {e}")


def fake_sampler_run(config, tokenizer, sample, verifier_pool, monkeypatch):
  """`sample` replaces `sampling.sample` for the test; the run has no model and no mesh."""
  monkeypatch.setattr(rollouts.sampling_lib, "sample", sample)
  return types.SimpleNamespace(
      config=config, tokenizer=tokenizer, sampler_graphdef=None, sampler_params=lambda: None, sample_mesh=None, mesh=None,
      verifier_pool=verifier_pool, peer_config=config_lib.peer_config(config))
