"""One tokenizer interface over Hugging Face `tokenizers` and SentencePiece, plus chat templates.

    tok = load_tokenizer("path/to/checkpoint")      # tokenizer.json, *.model, or a .gguf
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)

Chat templates are the checkpoint's own Jinja source, rendered in a sandbox with the same
helpers and whitespace settings as `transformers` (`raise_exception`, `tojson`,
`strftime_now`, `namespace`, `trim_blocks`/`lstrip_blocks`, loop controls, `{% generation %}`),
so the rendered prompt is byte-identical to what the model was trained on.

`encode` adds no BOS/EOS unless asked (`add_special_tokens=True`): chat templates write their
own, and prompts built from templates are the common case here.

A GGUF file's tokenizer is rebuilt here from its `tokenizer.ggml.*` metadata (byte-level BPE
vocabulary, merges, token types, special ids, the pre-tokenizer named by `tokenizer.ggml.pre`)
as a HF `tokenizers.Tokenizer`, with the chat template from `tokenizer.chat_template`. The file
is read by `mopd_jax.gguf_reader`, which the weights import too: this module imports no weights.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from mopd_jax.gguf_reader import metadata, open_gguf

PathLike = Union[str, os.PathLike]
Messages = Sequence[Any]  # dicts with "role"/"content", or objects with `as_dict()` (types.Message)


# --------------------------------------------------------------------------------------------
# Chat templates


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: marks assistant text; rendered unchanged here."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore attributes (no route to CPython internals)."""

  def __init__(*args, **kwargs):  # Jinja's signature trick, so `namespace(self=...)` works
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} is not allowed")


class _TemplateDict:
  """`dict(...)` for templates without exposing the `dict` type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # Jinja's own `tojson` HTML-escapes (`<` -> `\u003c`); chat templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
  """The template compiled in a sandbox configured like `transformers`' chat templating."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env.from_string(source)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain_message(message: Any) -> dict:
  if hasattr(message, "as_dict"):
    message = message.as_dict()
  elif dataclasses.is_dataclass(message) and not isinstance(message, type):
    message = dataclasses.asdict(message)
  if not isinstance(message, Mapping):
    raise TypeError(f"chat message must be a mapping or have as_dict(), got {type(message).__name__}")
  # Like transformers: drop None values (templates handle a missing key, not `None`), and
  # alias reasoning text under the names templates read.
  out = {k: v for k, v in message.items() if v is not None}
  reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
  if reasoning is not None:
    out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
  return out


def render_chat_template(
    template: str,
    messages: Messages,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: Optional[bool] = None,
    tools: Optional[Sequence[Mapping]] = None,
    special_tokens: Optional[Mapping[str, Optional[str]]] = None,
    **kwargs: Any,
) -> str:
  """Render `messages` with `template`. `enable_thinking=None` leaves the variable undefined,
  so a template's own default applies (Qwen3: thinking on)."""
  context = dict(special_tokens or {})
  context.update(kwargs)
  if enable_thinking is not None:
    context["enable_thinking"] = enable_thinking
  return compile_chat_template(template).render(
      messages=[_plain_message(m) for m in messages], tools=list(tools) if tools is not None else None,
      documents=None, add_generation_prompt=add_generation_prompt, **context)


# --------------------------------------------------------------------------------------------
# The interface


class Tokenizer(abc.ABC):
  """Text <-> token ids, special ids, and the checkpoint's chat template."""

  chat_template: Optional[str]

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included (the model's vocabulary may be larger)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> Optional[int]:
    ...

  @property
  @abc.abstractmethod
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end a generation (e.g. Qwen3: `<|im_end|>` and `<|endoftext|>`)."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def special_ids(self) -> frozenset[int]:
    """Control tokens: skipped by `decode(..., skip_special_tokens=True)`."""

  @abc.abstractmethod
  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    ...

  @abc.abstractmethod
  def token_to_id(self, token: str) -> Optional[int]:
    ...

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> Optional[str]:
    ...

  @abc.abstractmethod
  def special_token_strings(self) -> dict[str, Optional[str]]:
    """`bos_token`, `eos_token`, `pad_token`, `unk_token` as strings: template variables."""

  @property
  def eos_id(self) -> int:
    return self.eos_ids[0]

  def apply_chat_template(
      self,
      messages: Messages,
      *,
      add_generation_prompt: bool = True,
      enable_thinking: Optional[bool] = None,
      tokenize: bool = True,
      tools: Optional[Sequence[Mapping]] = None,
      chat_template: Optional[str] = None,
      **template_kwargs: Any,
  ) -> Union[list[int], str]:
    """The prompt for `messages`: token ids (`tokenize=True`) or the rendered string."""
    template = chat_template or self.chat_template
    if template is None:
      raise ValueError("tokenizer has no chat template; pass chat_template=... explicitly")
    text = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
        tools=tools, special_tokens=self.special_token_strings(), **template_kwargs)
    # The template writes BOS itself where the model wants one.
    return self.encode(text, add_special_tokens=False) if tokenize else text


def _unique(ids: Iterable[Optional[int]]) -> tuple[int, ...]:
  out: list[int] = []
  for i in ids:
    if i is not None and i not in out:
      out.append(int(i))
  return tuple(out)


# --------------------------------------------------------------------------------------------
# Hugging Face `tokenizers`


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` plus what `tokenizer_config.json` / GGUF metadata add to it."""

  backend: Any  # tokenizers.Tokenizer
  chat_template: Optional[str] = None
  bos_token: Optional[str] = None
  eos_token: Optional[str] = None
  pad_token: Optional[str] = None
  unk_token: Optional[str] = None
  extra_eos_ids: tuple[int, ...] = ()  # e.g. from generation_config.json
  add_bos_token: bool = False
  add_eos_token: bool = False

  def _id(self, token: Optional[str]) -> Optional[int]:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> Optional[int]:
    return self._id(self.bos_token)

  @functools.cached_property
  def eos_ids(self) -> tuple[int, ...]:
    ids = _unique([self._id(self.eos_token), *self.extra_eos_ids])
    if not ids:
      raise ValueError("tokenizer defines no EOS token (tokenizer_config eos_token / generation_config)")
    return ids

  @property
  def pad_id(self) -> int:
    pad = self._id(self.pad_token)
    return self.eos_ids[0] if pad is None else pad

  @functools.cached_property
  def special_ids(self) -> frozenset[int]:
    added = self.backend.get_added_tokens_decoder()
    ids = {i for i, tok in added.items() if tok.special}
    ids.update(i for i in (self.bos_id, self._id(self.pad_token), *self.eos_ids) if i is not None)
    return frozenset(ids)

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    ids = list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
    if add_special_tokens:
      # tokenizer.json post-processors add BOS for some models; tokenizer_config flags for others.
      bos = self.bos_id
      if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
      if self.add_eos_token and (not ids or ids[-1] != self.eos_ids[0]):
        ids.append(self.eos_ids[0])
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> Optional[str]:
    return self.backend.id_to_token(int(token_id))

  def special_token_strings(self) -> dict[str, Optional[str]]:
    names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
             "unk_token": self.unk_token}
    return {k: v for k, v in names.items() if v is not None}

  def save_pretrained(self, directory: PathLike) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` that `transformers.AutoTokenizer` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": self.add_bos_token,
        "add_eos_token": self.add_eos_token,
        "clean_up_tokenization_spaces": False,
        **self.special_token_strings(),
    }
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _token_content(value: Any) -> Optional[str]:
  """tokenizer_config stores special tokens as strings or AddedToken dicts."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _read_json(path: Path) -> dict:
  return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _eos_from_generation_config(directory: Path) -> tuple[int, ...]:
  ids = []
  for name in ("generation_config.json", "config.json"):
    eos = _read_json(directory / name).get("eos_token_id")
    ids.extend(eos if isinstance(eos, list) else [eos])
  return _unique(ids)


def _chat_template_from(directory: Path, config: Mapping) -> Optional[str]:
  # transformers >= 4.43 may write the template to its own file.
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.exists():
    return jinja_file.read_text(encoding="utf-8")
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: take "default"
    template = {t["name"]: t["template"] for t in template}.get("default")
  if template is None and (directory / "chat_template.json").exists():
    template = _read_json(directory / "chat_template.json").get("chat_template")
  return template


def load_hf_tokenizer(path: PathLike) -> HFTokenizer:
  """From a `tokenizer.json` (file or its directory) and the sibling config files."""
  import tokenizers

  path = Path(path)
  directory = path if path.is_dir() else path.parent
  tokenizer_file = path if path.is_file() else directory / "tokenizer.json"
  backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
  # Older checkpoints keep the special tokens in special_tokens_map.json.
  config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
  return HFTokenizer(
      backend=backend,
      chat_template=_chat_template_from(directory, config),
      bos_token=_token_content(config.get("bos_token")),
      eos_token=_token_content(config.get("eos_token")),
      pad_token=_token_content(config.get("pad_token")),
      unk_token=_token_content(config.get("unk_token")),
      extra_eos_ids=_eos_from_generation_config(directory),
      add_bos_token=bool(config.get("add_bos_token", False)),
      add_eos_token=bool(config.get("add_eos_token", False)),
  )


# --------------------------------------------------------------------------------------------
# SentencePiece


@dataclasses.dataclass(frozen=True, eq=False)
class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model`. Control pieces written in text (e.g. `</s>` from a chat
  template) are recognised and mapped to their ids, as `transformers`' slow tokenizers do."""

  processor: Any  # sentencepiece.SentencePieceProcessor
  chat_template: Optional[str] = None
  add_bos_token: bool = True  # SentencePiece LMs (Llama-2, Gemma) conventionally start with BOS
  add_eos_token: bool = False
  extra_eos_ids: tuple[int, ...] = ()

  def _opt(self, i: int) -> Optional[int]:
    return None if i < 0 else int(i)

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  @property
  def bos_id(self) -> Optional[int]:
    return self._opt(self.processor.bos_id())

  @functools.cached_property
  def eos_ids(self) -> tuple[int, ...]:
    ids = _unique([self._opt(self.processor.eos_id()), *self.extra_eos_ids])
    if not ids:
      raise ValueError("SentencePiece model has no EOS piece")
    return ids

  @property
  def pad_id(self) -> int:
    pad = self._opt(self.processor.pad_id())
    return self.eos_ids[0] if pad is None else pad

  @functools.cached_property
  def special_ids(self) -> frozenset[int]:
    sp = self.processor
    return frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))

  @functools.cached_property
  def _control_pattern(self) -> Optional[re.Pattern]:
    sp = self.processor
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    pieces = sorted((p for p in pieces if p), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    sp = self.processor
    ids: list[int] = []
    chunks = self._control_pattern.split(text) if self._control_pattern else [text]
    for k, chunk in enumerate(chunks):
      if k % 2:  # a control piece captured by the split
        ids.append(sp.piece_to_id(chunk))
      elif chunk:
        ids.extend(sp.encode(chunk))
    if add_special_tokens:
      if self.add_bos_token and self.bos_id is not None:
        ids.insert(0, self.bos_id)
      if self.add_eos_token:
        ids.append(self.eos_ids[0])
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    sp = self.processor
    out, run = [], []
    for i in map(int, ids):
      if sp.is_control(i):
        if run:
          out.append(sp.decode(run))
          run = []
        if not skip_special_tokens:
          out.append(sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(sp.decode(run))
    return "".join(out)

  def token_to_id(self, token: str) -> Optional[int]:
    i = self.processor.piece_to_id(token)  # unknown pieces map to the unk id
    return i if self.processor.id_to_piece(i) == token else None

  def id_to_token(self, token_id: int) -> Optional[str]:
    return self.processor.id_to_piece(int(token_id)) if 0 <= token_id < self.vocab_size else None

  def special_token_strings(self) -> dict[str, Optional[str]]:
    sp = self.processor
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id(), "unk_token": sp.unk_id()}
    return {k: sp.id_to_piece(i) for k, i in names.items() if i >= 0}


def load_sentencepiece_tokenizer(path: PathLike, *, chat_template: Optional[str] = None) -> SentencePieceTokenizer:
  """From a `.model` file; `tokenizer_config.json` beside it supplies the template and flags."""
  import sentencepiece

  path = Path(path)
  directory = path.parent
  config = _read_json(directory / "tokenizer_config.json")
  processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
  return SentencePieceTokenizer(
      processor=processor,
      chat_template=chat_template or _chat_template_from(directory, config),
      add_bos_token=bool(config.get("add_bos_token", True)),
      add_eos_token=bool(config.get("add_eos_token", False)),
      extra_eos_ids=_eos_from_generation_config(directory),
  )


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp): rebuilt from the file's `tokenizer.ggml.*` metadata

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_gpt2():
  from tokenizers import pre_tokenizers
  return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_digits_then_gpt2():
  # llama.cpp: regexes "\p{N}" then GPT-2's, i.e. every digit on its own (StarCoder, SmolLM).
  from tokenizers import pre_tokenizers
  return None, pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _pre_split(regex: str, nfc: bool = False):
  def build():
    from tokenizers import Regex, normalizers, pre_tokenizers
    return (normalizers.NFC() if nfc else None), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return build


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer), following llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), _pre_gpt2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    _pre_digits_then_gpt2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"),
                    _pre_split(_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _pre_split(_QWEN2_SPLIT, nfc=True)),
}

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def tokenizer_from_gguf_metadata(
    meta: Mapping[str, Any], tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
) -> HFTokenizer:
  """A byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) from GGUF metadata."""
  from tokenizers import AddedToken, decoders, models, processors
  from tokenizers import Tokenizer as Backend  # not this module's Tokenizer

  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"GGUF: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; known: {sorted(PRE_TOKENIZERS)}")
  types = list(token_types) or [_NORMAL] * len(tokens)
  vocab = {tok: i for i, tok in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                   continuing_subword_prefix="", end_of_word_suffix="")
  backend = Backend(bpe)
  normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]()
  if normalizer is not None:
    backend.normalizer = normalizer
  backend.pre_tokenizer = pre_tokenizer
  backend.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are matched whole and are special; user-defined ones
  # (e.g. <think>) are matched whole but decoded like text. Same ids as the vocabulary.
  backend.add_special_tokens(
      [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
  backend.add_tokens(
      [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

  def token(key: str) -> Optional[str]:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  bos = token("bos_token_id")
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  if add_bos and bos is not None:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
  extra_eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
  return HFTokenizer(
      backend=backend,
      chat_template=meta.get("tokenizer.chat_template"),
      bos_token=bos,
      eos_token=token("eos_token_id"),
      pad_token=token("padding_token_id"),
      unk_token=token("unknown_token_id"),
      extra_eos_ids=tuple(int(i) for i in extra_eos if i is not None),
      add_bos_token=add_bos,
      add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
  )


def load_gguf_tokenizer(path: PathLike) -> HFTokenizer:
  """The tokenizer stored in a GGUF file's metadata."""
  reader = open_gguf(path)
  fields = reader.fields
  if "tokenizer.ggml.tokens" not in fields:
    raise ValueError(f"GGUF {path}: no tokenizer (tokenizer.ggml.tokens) in the metadata")
  contents = lambda key: fields[key].contents() if key in fields else []
  return tokenizer_from_gguf_metadata(
      metadata(reader), contents("tokenizer.ggml.tokens"), contents("tokenizer.ggml.merges"),
      contents("tokenizer.ggml.token_type"))


# --------------------------------------------------------------------------------------------
# Dispatch


def load_tokenizer(path: PathLike) -> Tokenizer:
  """A tokenizer from a checkpoint directory, `tokenizer.json`, SentencePiece `.model` or `.gguf`."""
  path = Path(path)
  if path.is_file():
    if path.suffix == ".gguf":
      return load_gguf_tokenizer(path)
    if path.suffix == ".json":
      return load_hf_tokenizer(path)
    if path.suffix == ".model":
      return load_sentencepiece_tokenizer(path)
    raise ValueError(f"load_tokenizer: don't know how to read {path} (want tokenizer.json, *.model or *.gguf)")
  if path.is_dir():
    if (path / "tokenizer.json").exists():
      return load_hf_tokenizer(path)
    models = sorted(path.glob("*.model"))
    if models:
      preferred = path / "tokenizer.model"
      return load_sentencepiece_tokenizer(preferred if preferred.exists() else models[0])
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return load_tokenizer(ggufs[0])
    raise FileNotFoundError(
        f"load_tokenizer: {path} has no tokenizer.json, *.model or single *.gguf "
        f"(found: {sorted(p.name for p in path.iterdir())[:20]})")
  raise FileNotFoundError(f"load_tokenizer: {path} does not exist")
