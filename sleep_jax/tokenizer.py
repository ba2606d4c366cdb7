"""The checkpoint's tokenizer, for data, evaluation and generation; and training a byte-level BPE.

  load_tokenizer(path) -> Tokenizer     a directory (tokenizer.json, else tokenizer.model) or a file
  train_bpe(corpus_paths, out_dir, *, vocab_size=8192, min_frequency=2) -> Tokenizer

Two backends: Hugging Face `tokenizers` (tokenizer.json) and `sentencepiece` (.model). The
special ids are read where transformers reads them: the token strings from
tokenizer_config.json / special_tokens_map.json (the latter wins, as in transformers), ids from
generation_config.json / config.json where no token string is given. Every problem a user can
fix raises `TokenizerError` (a ValueError) with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence

# Files that travel with a tokenizer (save() copies those present beside the loaded one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
CORPUS_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


class TokenizerError(ValueError):
  """A tokenizer or corpus problem; the message is one line naming the file at fault."""


def _one_line(e: object) -> str:
  return " ".join(str(e).split())[:300]


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f"{path}: unreadable JSON ({_one_line(e)})") from None
  if not isinstance(out, dict):
    raise TokenizerError(f"{path}: expected a JSON object")
  return out


def _token_string(v) -> str | None:
  # transformers serialises special tokens as strings or as AddedToken dicts {"content": ...}.
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) else None


def _ids(v) -> list[int]:
  if isinstance(v, bool) or v is None:
    return []
  if isinstance(v, int):
    return [v]
  return [i for i in v if isinstance(i, int) and not isinstance(i, bool)] if isinstance(v, list) else []


class Tokenizer:
  """encode/decode plus the special ids; `backend` is "tokenizers" or "sentencepiece"."""

  def __init__(self, path: str, backend: str, impl, config_dir: str):
    self.path, self.backend, self._impl, self._dir = path, backend, impl, config_dir
    tc = _read_json(os.path.join(config_dir, "tokenizer_config.json"))
    stm = _read_json(os.path.join(config_dir, "special_tokens_map.json"))
    gen = _read_json(os.path.join(config_dir, "generation_config.json"))
    model = _read_json(os.path.join(config_dir, "config.json"))
    model = {**model.get("text_config", {}), **model} if isinstance(model.get("text_config"), dict) else model

    def special(kind: str) -> int | None:
      token = _token_string(stm.get(f"{kind}_token")) or _token_string(tc.get(f"{kind}_token"))
      if token is not None:
        tid = self.token_to_id(token)
        if tid is not None:
          return tid
      for src in (gen, model):
        ids = _ids(src.get(f"{kind}_token_id"))
        if ids:
          return ids[0]
      return self._backend_special(kind)

    self.bos_id, self.eos_id, self.pad_id = special("bos"), special("eos"), special("pad")
    # Generation stops at any of these (instruct checkpoints list several, e.g. <|im_end|> and
    # <|endoftext|>, in generation_config.json).
    stops = [self.eos_id] + _ids(gen.get("eos_token_id")) + _ids(model.get("eos_token_id"))
    self.eos_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
    # Whether transformers' tokenizer(text) would prepend BOS (Llama-style); encode() never does
    # unless asked, so callers that must match transformers pass add_bos=self.add_bos_default.
    self.add_bos_default = bool(tc.get("add_bos_token", False)) if "add_bos_token" in tc else self._post_adds_bos()

  # -- backend specifics -------------------------------------------------------------------

  def _backend_special(self, kind: str) -> int | None:
    if self.backend == "sentencepiece":
      i = {"bos": self._impl.bos_id, "eos": self._impl.eos_id, "pad": self._impl.pad_id}[kind]()
      return i if i >= 0 else None
    return None

  def _post_adds_bos(self) -> bool:
    if self.backend != "tokenizers" or self.bos_id is None:
      return False
    ids = self._impl.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == self.bos_id

  def token_to_id(self, token: str) -> int | None:
    if self.backend == "tokenizers":
      return self._impl.token_to_id(token)
    i = self._impl.piece_to_id(token)
    return None if self._impl.is_unknown(i) and token != self._impl.id_to_piece(i) else i

  @property
  def vocab_size(self) -> int:
    if self.backend == "tokenizers":
      return self._impl.get_vocab_size(with_added_tokens=True)
    return self._impl.get_piece_size()

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    if self.backend == "tokenizers":
      ids = self._impl.encode(text, add_special_tokens=False).ids
    else:
      ids = self._impl.encode(text, out_type=int)
    if add_bos:
      if self.bos_id is None:
        raise TokenizerError(f"{self.path}: add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id, *ids]
    return list(ids)

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self.backend == "tokenizers":
      return self._impl.decode(ids, skip_special_tokens=skip_special)
    sp = self._impl
    # sentencepiece always drops control pieces (bos/eos/pad); to keep them, decode the runs
    # between them and put the control pieces back as text.
    special = lambda i: sp.is_control(i)  # noqa: E731
    if skip_special or not any(special(i) for i in ids):
      return sp.decode(ids)
    out, run = [], []
    for i in ids:
      if special(i):
        out += [sp.decode(run), sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [sp.decode(run)])

  def save(self, out_dir: str) -> list[str]:
    """Copy the tokenizer's files into out_dir (an exported checkpoint carries them). A
    tokenizer loaded from a lone file gets its canonical name and, for tokenizer.json, a
    tokenizer_config.json naming the special tokens so transformers can load it."""
    os.makedirs(out_dir, exist_ok=True)
    canonical = "tokenizer.json" if self.backend == "tokenizers" else "tokenizer.model"
    copied = []
    srcs = {canonical: self.path}
    for f in TOKENIZER_FILES:
      p = os.path.join(self._dir, f)
      if f not in srcs and os.path.isfile(p) and f not in ("tokenizer.json", "tokenizer.model"):
        srcs[f] = p
    for f, src in srcs.items():
      dst = os.path.join(out_dir, f)
      if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
      copied.append(f)
    if "tokenizer_config.json" not in srcs and self.backend == "tokenizers":
      _write_config(out_dir, {k: self._impl.id_to_token(i) for k, i in
                              (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)) if i is not None})
      copied.append("tokenizer_config.json")
    return copied

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path!r}, {self.backend}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A directory (tokenizer.json, else tokenizer.model) or a tokenizer file (.json / .model)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        file = os.path.join(path, name)
        break
    else:
      raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
  elif os.path.isfile(path):
    file = path
  else:
    raise TokenizerError(f"{path}: no such tokenizer file or directory")
  config_dir = os.path.dirname(os.path.abspath(file))
  if file.endswith(".model"):
    import sentencepiece as spm

    try:
      impl = spm.SentencePieceProcessor(model_file=file)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
      raise TokenizerError(f"{file}: not a sentencepiece model ({_one_line(e)})") from None
    return Tokenizer(file, "sentencepiece", impl, config_dir)
  from tokenizers import Tokenizer as HFTokenizer

  try:
    impl = HFTokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed JSON
    raise TokenizerError(f"{file}: not a tokenizers JSON file ({_one_line(e)})") from None
  return Tokenizer(file, "tokenizers", impl, config_dir)


# -- training ----------------------------------------------------------------------------------

def _write_config(out_dir: str, tokens: dict, model_max_length: int | None = None) -> None:
  config = {"tokenizer_class": "PreTrainedTokenizerFast",
            # transformers' default would rewrite " ." as "." on decode, breaking the round trip.
            "clean_up_tokenization_spaces": False,
            **{f"{k}_token": v for k, v in tokens.items()}}
  if model_max_length is not None:
    config["model_max_length"] = model_max_length
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")


def corpus_files(corpus_paths: Sequence[str]) -> list[str]:
  """Files named directly, plus *.txt/*.md/*.py/*.jsonl under directories (sorted: deterministic)."""
  files = []
  for p in corpus_paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(CORPUS_SUFFIXES))
      if not found:
        raise TokenizerError(f"{p}: no {'/'.join('*' + s for s in CORPUS_SUFFIXES)} files under this directory")
      files += found
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise TokenizerError(f"{p}: no such corpus file or directory")
  return files


def _read_text(path: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise TokenizerError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from None
  if b"\0" in raw[:8192]:
    raise TokenizerError(f"{path}: binary file (NUL bytes), not a text corpus")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _documents(path: str, text: str) -> Iterator[str]:
  if not path.endswith(".jsonl"):
    # Blocks of lines: big enough to keep the trainer busy, small enough to bound memory.
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), 4096):
      yield "".join(lines[i:i + 4096])
    return
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      doc = json.loads(line)["text"]
      if not isinstance(doc, str):
        raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
      raise TokenizerError(f"{path}:{n}: expected a JSON object with a string \"text\" field") from None
    yield doc


def iter_corpus(corpus_paths: Sequence[str]) -> Iterator[str]:
  """The corpus's documents. A named file that is empty, binary or not UTF-8 is an error; in a
  directory, binary files are skipped with a warning and empty ones quietly (source trees hold
  empty __init__.py files)."""
  named = {os.fspath(p) for p in corpus_paths}
  total = 0
  for path in corpus_files(corpus_paths):
    try:
      text = _read_text(path)
    except TokenizerError as e:
      if path in named:
        raise
      print(f"warning: skipping {e}", file=sys.stderr)
      continue
    if path in named and not text.strip():
      raise TokenizerError(f"{path}: empty corpus file")
    for doc in _documents(path, text):
      total += len(doc)
      yield doc
  if total == 0:
    raise TokenizerError(f"{', '.join(map(str, corpus_paths))}: the corpus holds no text")


def train_bpe(corpus_paths: Sequence[str], out_dir: str, *, vocab_size: int = 8192, min_frequency: int = 2,
              model_max_length: int = 1 << 20, show_progress: bool = True) -> Tokenizer:
  """Byte-level BPE (GPT-2 style: lossless on any unicode text) with <|bos|>, <|eos|>, <|pad|>.

  Writes out_dir/tokenizer.json and tokenizer_config.json (transformers' AutoTokenizer loads
  the directory). model_max_length is only what transformers warns at; our models take any.
  """
  return train_bpe_on(iter_corpus(corpus_paths), out_dir, vocab_size=vocab_size, min_frequency=min_frequency,
                      model_max_length=model_max_length, show_progress=show_progress)


def train_bpe_on(documents: Iterator[str], out_dir: str, *, vocab_size: int = 8192, min_frequency: int = 2,
                 model_max_length: int = 1 << 20, show_progress: bool = True) -> Tokenizer:
  """train_bpe over an iterator of documents (the data pipeline's train split)."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(SPECIALS):
    raise TokenizerError(f"vocab_size {vocab_size} is below the byte alphabet plus specials "
                         f"({len(alphabet) + len(SPECIALS)})")
  if min_frequency < 1:
    raise TokenizerError(f"min_frequency must be >= 1, got {min_frequency}")
  corpus = iter(documents)
  first = next(corpus, None)  # surfaces a bad corpus before the trainer starts its progress bars
  tok = HFTokenizer(models.BPE())
  # No normaliser and no prefix space: decode(encode(x)) == x exactly.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                special_tokens=list(SPECIALS.values()), initial_alphabet=alphabet)

  def docs():
    if first is not None:
      yield first
    yield from corpus

  try:
    tok.train_from_iterator(docs(), trainer)
  except Exception as e:  # the iterator's TokenizerError comes back wrapped by the Rust side
    if isinstance(e, TokenizerError):
      raise
    cause = e.__cause__ or e.__context__
    if isinstance(cause, TokenizerError):
      raise cause from None
    raise TokenizerError(f"training BPE failed ({_one_line(e)})") from None
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  _write_config(out_dir, {k: v for k, v in SPECIALS.items()}, model_max_length)
  return load_tokenizer(out_dir)
