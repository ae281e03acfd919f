"""Tokenizers and chat templates: identical to transformers on SmolLM2 and Qwen3's template;
SentencePiece models round-trip."""

import datetime
import io
import json

import jinja2
import pytest

from mopd_jax.tokenizer import (
    HFTokenizer, SentencePieceTokenizer, load_tokenizer, render_chat_template)
from mopd_jax.types import Message

transformers = pytest.importorskip("transformers")

STRINGS = [
    "Hello world!",
    "  leading, inner   and trailing spaces   ",
    "Ünïcödé — 日本語のテキスト, emoji 🤖🚀, Ελληνικά, עברית",
    "<|im_start|>user\nhi<|im_end|>\n",
    "tabs\tand\nnewlines\r\n\n",
    "I'm here, you're there; they'd've",
    "numbers 12345 and 3.14159, year 2024",
    "def f(x):\n    return x**2  # comment",
    "<repo_name>x<file_sep>y<|endoftext|>",
    "",
]

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2? Answer in ünïcödé."},
]


def _smollm2_gguf():
  from mopd_jax.weights import smollm2_gguf_path
  try:
    return smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 GGUF absent: {e}")


@pytest.fixture(scope="module")
def smollm2():
  return load_tokenizer(_smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_files(smollm2, tmp_path_factory):
  directory = tmp_path_factory.mktemp("smollm2_tok")
  smollm2.save_pretrained(directory)
  return directory


def _same_as_transformers(ours, hf):
  for s in STRINGS:
    ids = hf.encode(s, add_special_tokens=False)
    assert ours.encode(s) == ids, s
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), s
    assert ours.decode(ours.encode(s)) == s
  for system in (None, "You are terse."):
    messages = ([{"role": "system", "content": system}] if system else []) + CHAT
    for gen in (True, False):
      text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == text
      ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
      assert ours.apply_chat_template(messages, add_generation_prompt=gen) == list(ids)
  assert ours.vocab_size == len(hf)
  assert ours.bos_id == hf.bos_token_id and ours.eos_ids[0] == hf.eos_token_id and ours.pad_id == hf.pad_token_id
  assert set(hf.all_special_ids) <= ours.special_ids


def test_smollm2_tokenizer_files_load_in_transformers(smollm2, smollm2_files):
  hf = transformers.AutoTokenizer.from_pretrained(smollm2_files)
  _same_as_transformers(smollm2, hf)
  again = load_tokenizer(smollm2_files)
  assert isinstance(again, HFTokenizer)
  assert again.encode(STRINGS[2]) == smollm2.encode(STRINGS[2])
  assert again.chat_template == smollm2.chat_template and again.eos_ids == smollm2.eos_ids


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_loader(smollm2):
  path = _smollm2_gguf()
  hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  _same_as_transformers(smollm2, hf)


def test_smollm2_specials_and_digits(smollm2):
  assert (smollm2.bos_id, smollm2.eos_ids, smollm2.pad_id) == (1, (2,), 2)
  assert smollm2.encode("<|im_start|>") == [1]
  assert smollm2.special_ids >= {0, 1, 2}
  # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split digits one by one.
  assert len(smollm2.encode("12345")) == 5
  text = smollm2.apply_chat_template([Message("user", "hi")], tokenize=False)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------
# Qwen3's chat template (copied from Qwen/Qwen3-8B tokenizer_config.json)

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <today>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

AGENT_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "<think>\nIt is warm.\n</think>\n\nIt is 21 °C."},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]


def _tiny_hf_pair():
  """A small byte-level BPE tokenizer, as ours and as transformers' fast tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  backend.train_from_iterator(["the weather is warm in the city today"] * 20, trainer=trainer)
  backend.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
  ours = HFTokenizer(backend=backend, chat_template=QWEN3_TEMPLATE, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE)
  return ours, hf


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen3_template_matches_transformers(enable_thinking, with_tools):
  ours, hf = _tiny_hf_pair()
  kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
  tools = TOOLS if with_tools else None
  for messages in (AGENT_CHAT, AGENT_CHAT[1:2]):
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    text = ours.apply_chat_template(messages, tools=tools, tokenize=False, enable_thinking=enable_thinking)
    assert text == expected
    ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=True, **kwargs)
    assert ours.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking) == list(ids["input_ids"])
  tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n" if enable_thinking is False else "<|im_start|>assistant\n"
  assert text.endswith("<|im_end|>\n" + tail)


def test_qwen3_template_renders_history():
  text = render_chat_template(QWEN3_TEMPLATE, AGENT_CHAT, tools=TOOLS, enable_thinking=False)
  assert '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city <today>"' in text
  assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in text
  assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in text
  # Reasoning of turns before the last user query is dropped, as Qwen3 does.
  assert "It is warm" not in text and "Need the tool" not in text
  assert "<|im_start|>assistant\nIt is 21 °C.<|im_end|>" in text


def test_template_helpers():
  render = lambda src, **kw: render_chat_template(src, [], add_generation_prompt=False, **kw)
  with pytest.raises(jinja2.TemplateError, match="no system role"):
    render("{{ raise_exception('no system role') }}")
  assert render("{{ strftime_now('%Y') }}") == str(datetime.date.today().year)
  assert render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'
  assert render("{{ x | tojson(indent=2) }}", x=[1]) == "[\n  1\n]"
  assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
  assert render("{% generation %}kept{% endgeneration %}") == "kept"
  assert render("  {% if true %}\nx{% endif %}\n") == "x"  # trim_blocks + lstrip_blocks
  with pytest.raises(jinja2.exceptions.SecurityError):
    render("{% set ns = namespace(_x=1) %}")
  assert render("{{ enable_thinking is defined }}") == "False"
  assert render("{{ enable_thinking }}", enable_thinking=False) == "False"


# --------------------------------------------------------------------------------------------
# SentencePiece


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  import sentencepiece as spm

  words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "東京", "tokyo", "model", "train", "pieces"]
  lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 8)) + f" {i}." for i in range(300)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=320, model_type="unigram",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      pad_id=3, user_defined_symbols=["<tool>"], minloglevel=2)
  directory = tmp_path_factory.mktemp("sp")
  (directory / "tokenizer.model").write_bytes(model.getvalue())
  template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
  (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": True}))
  return directory


def test_sentencepiece_round_trip(sp_dir):
  tok = load_tokenizer(sp_dir)
  assert isinstance(tok, SentencePieceTokenizer)
  for s in ["alpha beta gamma", "  spaces  kept ", "über naïve 東京 — unseen ✓ 🤖", "x\ny\tz", "<tool> call", ""]:
    ids = tok.encode(s)
    assert tok.decode(ids) == s, s
  assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size) == (1, (2,), 3, 320)
  assert tok.special_ids >= {0, 1, 2, 3} and tok.token_to_id("<tool>") not in tok.special_ids
  assert tok.encode("alpha", add_special_tokens=True)[0] == 1
  assert tok.encode("alpha</s>")[-1] == 2  # control piece written in text -> its id
  assert tok.decode(tok.encode("alpha</s>"), skip_special_tokens=True) == "alpha"
  ids = tok.apply_chat_template([{"role": "user", "content": "beta"}])
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids) == "<s>[user] beta</s>"


def test_load_tokenizer_dispatch(sp_dir, tmp_path):
  assert isinstance(load_tokenizer(sp_dir / "tokenizer.model"), SentencePieceTokenizer)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")
