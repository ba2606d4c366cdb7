"""Text corpora as lists of documents: listing, validation, content identity, train/eval split.

  scan(corpus_cfg, index, eval_fraction) -> Corpus(name, digest, refs={"train": [...], "eval": [...]})
  read_document(ref) -> str

A document is one file (format text without a separator, stdlib), one separator-delimited
piece of a text file, one JSONL line's `field`, or one TFDS example's `field`. A ref is a
small picklable tuple naming where the document lives, so grain workers read and tokenize
documents themselves: ("bytes", path, start, end), ("jsonl", path, start, end, field) or
("tfds", dataset_dir, split, index, field).

The split is by document, so no eval text appears in training: a document is eval iff a hash
of its name (whole files: the path relative to the corpus root) or of its content falls
below `eval_fraction`; adding a file never moves another between splits. A corpus too small
to put a document on each side holds out its last document; a one-document corpus holds
out the tail of that document (from a line boundary at 1 - eval_fraction of its bytes).

The digest hashes every file's contents (not names of the root or mtimes): editing the
corpus rebuilds its dataset, copying it elsewhere does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sysconfig

from sleep_jax.data.builders import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex", ".html", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs")
# The stdlib corpus: the library's own modules, not its test suites (their data files
# include deliberately broken encodings) nor installed third-party packages.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
  name: str
  key: str  # the config key it came from, for messages
  digest: str
  refs: dict  # {"train": [ref, ...], "eval": [ref, ...]}


def _bad(key: str, what: str) -> DataError:
  return DataError(f"{key}: {what}")


def corpus_name(c, index: int) -> str:
  if c.name:
    return c.name
  if c.format == "stdlib":
    return "stdlib" + (f"_{c.path}" if c.path else "")
  base = os.path.basename(os.path.normpath(os.path.expanduser(c.path)))
  return os.path.splitext(base)[0] or f"corpus{index}"


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _files(c, key: str) -> tuple[str, list[str]]:
  """(root, sorted files) of a text / jsonl / stdlib corpus."""
  if c.format == "stdlib":
    root = os.path.join(stdlib_root(), c.path) if c.path else stdlib_root()
    if not os.path.isdir(root):
      raise _bad(f"{key}.path", f"no such directory in the standard library: {root}")
    out = []
    for d, dirs, fs in os.walk(root):
      dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP_DIRS)
      out += [os.path.join(d, f) for f in fs if f.endswith(".py")]
    return root, sorted(out)
  path = os.path.abspath(os.path.expanduser(c.path))
  if os.path.isfile(path):
    return os.path.dirname(path), [path]
  if not os.path.isdir(path):
    raise _bad(f"{key}.path", f"no such file or directory: {path}")
  suffixes = (".jsonl",) if c.format == "jsonl" else TEXT_SUFFIXES
  out = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
               if f.endswith(suffixes) and not f.startswith("."))
  if not out:
    raise _bad(f"{key}.path", f"no {'/'.join('*' + s for s in suffixes)} files under {path}")
  return path, out


def _read_checked(path: str, key: str, *, skip_bad: bool) -> bytes | None:
  """The file's bytes if it is UTF-8 text; a one-line DataError (or None if skip_bad) if not."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise _bad(f"{key}.path", f"cannot read {path} ({e.strerror or e})") from None
  why = None
  if b"\0" in raw:
    why = "binary file (NUL bytes), not text"
  else:
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError as e:
      why = f"not UTF-8 text (byte {e.start})"
  if why is None:
    return raw
  if skip_bad:
    return None
  raise _bad(f"{key}.path", f"{path}: {why}")


def _in_eval(name: bytes, eval_fraction: float) -> bool:
  h = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big")
  return h / 2.0 ** 64 < eval_fraction


def _split_bytes_docs(c, key: str, root: str, files: list[str], eval_fraction: float, digest):
  docs = []  # (ref, in_eval)
  sep = c.separator.encode("utf-8")
  for path in files:
    raw = _read_checked(path, key, skip_bad=c.format == "stdlib")
    if raw is None:
      continue
    rel = os.path.relpath(path, root).encode()
    digest.update(len(rel).to_bytes(8, "big") + rel + len(raw).to_bytes(8, "big"))
    digest.update(raw)
    if c.format == "jsonl":
      docs += _jsonl_docs(path, raw, c.field, key, eval_fraction)
      continue
    if not raw.strip():
      if len(files) == 1:
        raise _bad(f"{key}.path", f"{path}: empty corpus file")
      continue  # source trees hold empty __init__.py files
    if not sep:
      docs.append((("bytes", path, 0, len(raw)), _in_eval(rel, eval_fraction)))
      continue
    start = 0
    while start < len(raw):
      end = raw.find(sep, start)
      end = len(raw) if end < 0 else end
      if raw[start:end].strip():
        docs.append((("bytes", path, start, end), _in_eval(raw[start:end], eval_fraction)))
      start = end + len(sep)
  return docs


def _jsonl_docs(path: str, raw: bytes, field: str, key: str, eval_fraction: float):
  docs, start = [], 0
  if not raw.strip():
    raise _bad(f"{key}.path", f"{path}: empty corpus file")
  for n, line in enumerate(raw.split(b"\n"), 1):
    end = start + len(line)
    if line.strip():
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise _bad(f"{key}.path", f"{path}:{n}: malformed JSON ({e.msg})") from None
      if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
        raise _bad(f"{key}.field", f"{path}:{n}: no string field {field!r} in this JSON line")
      if doc[field].strip():
        docs.append((("jsonl", path, start, end, field), _in_eval(line, eval_fraction)))
    start = end + 1
  return docs


@functools.lru_cache(maxsize=8)
def _tfds_source(dataset_dir: str, split: str):
  import tensorflow_datasets as tfds

  return tfds.builder_from_directory(dataset_dir).as_data_source(split)


def _tfds_docs(c, key: str, eval_fraction: float, digest):
  path = os.path.abspath(os.path.expanduser(c.path))
  info_path = os.path.join(path, "dataset_info.json")
  if not os.path.isfile(info_path):
    raise _bad(f"{key}.path", f"no prepared TFDS dataset (dataset_info.json) in {path}")
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder_from_directory(path)
  except Exception as e:  # TFDS raises assorted errors for a damaged dataset dir
    raise _bad(f"{key}.path", f"unreadable TFDS dataset in {path} ({' '.join(str(e).split())[:200]})") from None
  if c.split not in builder.info.splits:
    raise _bad(f"{key}.split", f"TFDS dataset {path} has no split {c.split!r} (has {sorted(builder.info.splits)})")
  if c.field not in builder.info.features:
    raise _bad(f"{key}.field", f"TFDS dataset {path} has no feature {c.field!r} (has {sorted(builder.info.features)})")
  try:
    source = _tfds_source(path, c.split)
  except Exception as e:  # tfrecord-only datasets cannot be read at random without TensorFlow
    raise _bad(f"{key}.path", f"TFDS dataset {path} cannot be read as array_record "
                              f"({' '.join(str(e).split())[:160]}); prepare it with file_format=array_record") from None
  with open(info_path, "rb") as f:
    digest.update(f.read())
  digest.update(f"{c.split}\0{c.field}".encode())
  return [(("tfds", path, c.split, i, c.field), _in_eval(f"{c.split}:{i}".encode(), eval_fraction))
          for i in range(len(source))]


def _hold_out(docs, key: str) -> tuple[list, list]:
  train = [r for r, e in docs if not e]
  eval_ = [r for r, e in docs if e]
  if train and eval_:
    return train, eval_
  refs = [r for r, _ in docs]
  if len(refs) >= 2:
    return refs[:-1], refs[-1:]
  ref = refs[0]
  if ref[0] != "bytes":
    raise _bad(key, "one document only: at least two are needed (one for eval)")
  _, path, start, end = ref
  with open(path, "rb") as f:
    f.seek(start)
    raw = f.read(end - start)
  cut = raw.rfind(b"\n", 0, int(len(raw) * 0.9)) + 1 or int(len(raw) * 0.9)
  while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # never inside a UTF-8 sequence
    cut += 1
  if not 0 < cut < len(raw):
    raise _bad(key, f"{path}: too short to hold out an eval part ({len(raw)} bytes)")
  return [("bytes", path, start, start + cut)], [("bytes", path, start + cut, end)]


def scan(c, index: int, eval_fraction: float) -> Corpus:
  """List, validate and split one corpus (reads it once; tokenizes nothing)."""
  key = f"data.corpora[{index}]"
  digest = hashlib.blake2b(digest_size=16)
  digest.update(json.dumps({"format": c.format, "field": c.field, "separator": c.separator,
                            "eval_fraction": eval_fraction}, sort_keys=True).encode())
  if c.format == "tfds":
    docs = _tfds_docs(c, key, eval_fraction, digest)
  else:
    root, files = _files(c, key)
    docs = _split_bytes_docs(c, key, root, files, eval_fraction, digest)
  if not docs:
    raise _bad(f"{key}.path", f"the corpus holds no text ({c.path or c.format})")
  train, eval_ = _hold_out(docs, key)
  return Corpus(corpus_name(c, index), key, digest.hexdigest(), {"train": train, "eval": eval_})


def read_document(ref: tuple) -> str:
  kind = ref[0]
  if kind == "tfds":
    _, path, split, i, field = ref
    value = _tfds_source(path, split)[i][field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  path, start, end = ref[1:4]
  with open(path, "rb") as f:
    f.seek(start)
    raw = f.read(end - start)
  if kind == "jsonl":
    return json.loads(raw)[ref[4]]
  return raw.decode("utf-8")
