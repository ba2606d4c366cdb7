"""Tokenized, packed corpora as TFDS datasets (array_record), built once in grain workers.

  data_tokenizer(cfg) -> ByteTokenizer | tokenizer.Tokenizer     (trains a BPE if asked to)
  corpus_builders(cfg, prepare=True) -> [(Corpus, SleepJaxCorpus builder), ...]
  pack_report(builder) -> dict | None    packing stats of a built corpus

Each corpus of data.corpora is its own dataset, split train/eval by document (corpus.py):

  <data_dir>/sleep_jax_corpus/<name>-<hash>/1.0.0/sleep_jax_corpus-{train,eval}.array_record-*

<hash> covers the corpus digest (its files' contents), the tokenizer's files, seq_len and
packing, so a changed corpus or tokenizer rebuilds and a changed mixture weight does not.
The first pass reads and tokenizes documents in grain worker threads (batches of documents:
both tokenizer backends encode a batch in native threads), packs them in document order
(packing.py) and writes windows with a progress bar.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import grain
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from sleep_jax.data import builders
from sleep_jax.data import corpus as corpus_lib
from sleep_jax.data.packing import PackStats, pack

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the record layout or the packing rule changes
DOCS_PER_READ = 32  # documents per grain element: large enough for batch encoding


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256, no specials): data.tokenizer=bytes."""

  path, backend, vocab_size = "bytes", "bytes", 256
  bos_id = eos_id = pad_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode_batch(tok, texts: list[str]) -> list[np.ndarray]:
  if tok.backend == "tokenizers":
    return [np.asarray(e.ids, np.int32) for e in tok._impl.encode_batch(texts, add_special_tokens=False)]
  if tok.backend == "sentencepiece":
    return [np.asarray(ids, np.int32) for ids in tok._impl.encode(texts, out_type=int)]
  return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]


def data_tokenizer(cfg):
  """data.tokenizer loaded; a missing one is trained first when data.train_tokenizer_vocab > 0."""
  from sleep_jax.tokenizer import load_tokenizer, train_bpe_on

  if cfg.tokenizer == "bytes":
    return ByteTokenizer()
  path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
  if not os.path.exists(path) and cfg.train_tokenizer_vocab > 0:
    out_dir = os.path.dirname(path) if path.endswith(".json") else path
    with builders._file_lock(os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.lock")):
      if not os.path.exists(path):  # another process may have trained it while we waited
        docs = (corpus_lib.read_document(r) for c in scan_all(cfg) for r in c.refs["train"])
        log.info("training a %d-token BPE on the train documents -> %s", cfg.train_tokenizer_vocab, out_dir)
        train_bpe_on(docs, out_dir, vocab_size=int(cfg.train_tokenizer_vocab), show_progress=False)
  return load_tokenizer(path)


def tokenizer_digest(tok) -> str:
  """Hash of the files that decide the token ids (the tokenizer file and its special-token configs)."""
  if tok.backend == "bytes":
    return "bytes"
  h = hashlib.blake2b(digest_size=16)
  d = os.path.dirname(tok.path)
  for f in (tok.path, os.path.join(d, "tokenizer_config.json"), os.path.join(d, "special_tokens_map.json")):
    if os.path.isfile(f):
      with open(f, "rb") as fh:
        h.update(os.path.basename(f).encode() + b"\0" + fh.read())
  return h.hexdigest()


def scan_all(cfg) -> list[corpus_lib.Corpus]:
  return [_scan(c, i, float(cfg.eval_fraction)) for i, c in enumerate(cfg.corpora)]


@functools.lru_cache(maxsize=32)
def _scan_cached(c_json: str, index: int, eval_fraction: float, stamp: tuple):
  from sleep_jax.config import CorpusConfig

  return corpus_lib.scan(CorpusConfig(**json.loads(c_json)), index, eval_fraction)


def _scan(c, index: int, eval_fraction: float) -> corpus_lib.Corpus:
  # preflight, dataset_info and the pipeline each ask; read the files once per change.
  import dataclasses

  path = corpus_lib.stdlib_root() if c.format == "stdlib" else os.path.expanduser(c.path)
  try:
    st = os.stat(path)
    stamp = (path, st.st_mtime_ns, st.st_size, st.st_ino)
  except OSError:
    stamp = (path, None)
  if os.path.isdir(path):  # a file inside a directory can change without the dir's mtime
    return corpus_lib.scan(c, index, eval_fraction)
  return _scan_cached(json.dumps(dataclasses.asdict(c), sort_keys=True), index, eval_fraction, stamp)


def packed_features() -> tfds.features.FeaturesDict:
  enc = tfds.features.Encoding.BYTES  # int32 raw bytes, as builders.features()
  vec = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=enc)  # noqa: E731
  return tfds.features.FeaturesDict({"tokens": vec(), "loss_mask": vec(), "positions": vec(),
                                     "segment_ids": vec(), "difficulty": tfds.features.Scalar(dtype=np.int32)})


class CorpusBuildConfig(tfds.core.BuilderConfig):

  def __init__(self, *, corpus: corpus_lib.Corpus, tokenizer, tokenizer_digest: str, seq_len: int, pack: bool,
               threads: int, stats_path_of):
    identity = dict(format=FORMAT, builders_format=builders.FORMAT, corpus=corpus.digest, tokenizer=tokenizer_digest,
                    seq_len=seq_len, pack=pack, eos=tokenizer.eos_id)
    stem = "".join(ch if ch.isalnum() else "_" for ch in corpus.name)[:40] or "corpus"
    name = f"{stem}-{builders.stable_hash(identity)}"
    super().__init__(name=name, version=builders.VERSION, description=json.dumps(
        {**identity, "name": corpus.name, "tokenizer_path": tokenizer.path}, sort_keys=True))
    self.corpus, self.tokenizer, self.seq_len, self.pack, self.threads = corpus, tokenizer, seq_len, pack, threads
    self.stats_path = stats_path_of(name)


class SleepJaxCorpus(tfds.core.GeneratorBasedBuilder):
  """Packed token windows of one text corpus."""

  code_path = None  # see SleepJaxTask.code_path
  VERSION = tfds.core.Version(builders.VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description="sleep_jax packed text: " + self.builder_config.description,
                                 features=packed_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    self._stats = {}
    return {split: self._generate_examples(split) for split in ("train", "eval")}

  def _generate_examples(self, split: str):
    c = self.builder_config
    stats = PackStats(c.seq_len)
    windows = pack(tokenized_documents(c.corpus.refs[split], c.tokenizer, threads=c.threads,
                                       desc=f"tokenize {c.corpus.name} {split}"),
                   c.seq_len, concat=c.pack, stats=stats)
    for i, w in enumerate(windows):
      yield i, {**w, "difficulty": 0}
    self._stats[split] = stats.as_dict()
    if len(self._stats) == 2:  # both splits written: the report travels beside the dataset
      os.makedirs(os.path.dirname(c.stats_path), exist_ok=True)
      with open(c.stats_path + ".tmp", "w") as f:
        json.dump(self._stats, f, sort_keys=True)
      os.replace(c.stats_path + ".tmp", c.stats_path)
      log.info("corpus %s: %s", c.corpus.name, _describe(self._stats))


def _read_and_encode(refs: list, tok, eos_id) -> tuple[list[np.ndarray], int]:
  texts = [corpus_lib.read_document(r) for r in refs]
  ids = encode_batch(tok, texts)
  if eos_id is not None:  # the end of a document is a target too (generation learns to stop)
    ids = [np.append(x, np.int32(eos_id)) for x in ids]
  return ids, sum(len(t.encode("utf-8")) for t in texts)


def tokenized_documents(refs: list, tok, *, threads: int = 2, desc: str = "tokenize", progress: bool = True):
  """Token arrays of the documents `refs`, in order, read and encoded by grain worker threads."""
  groups = [refs[i:i + DOCS_PER_READ] for i in range(0, len(refs), DOCS_PER_READ)]
  ds = grain.MapDataset.source(groups).map(functools.partial(_read_and_encode, tok=tok, eos_id=tok.eos_id))
  n = max(0, int(threads))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=n, prefetch_buffer_size=2 * n))
  bar = tqdm.tqdm(total=len(refs), desc=desc, unit=" doc", mininterval=1.0, leave=False, disable=not progress)
  try:
    for ids, _ in it:
      bar.update(len(ids))
      yield from ids
  finally:
    bar.close()


def _describe(stats: dict) -> str:
  t = stats["train"]
  return (f"{t['documents']} train documents, {t['tokens']} tokens in {t['windows']} windows of {t['seq_len']}, "
          f"packing efficiency {t['packing_efficiency']:.4f}; eval {stats['eval']['windows']} windows")


def corpus_builders(cfg, *, prepare: bool = True) -> list[tuple[corpus_lib.Corpus, SleepJaxCorpus]]:
  tok = data_tokenizer(cfg)
  tdig = tokenizer_digest(tok)
  root = builders.data_dir(cfg)
  stats_of = lambda name: os.path.join(root, "sleep_jax_corpus", f".{name}.packing.json")  # noqa: E731
  out = []
  for corpus in scan_all(cfg):
    config = CorpusBuildConfig(corpus=corpus, tokenizer=tok, tokenizer_digest=tdig, seq_len=int(cfg.seq_len),
                               pack=bool(cfg.pack), threads=int(cfg.tokenize_threads), stats_path_of=stats_of)
    make = lambda config=config: SleepJaxCorpus(config=config, data_dir=root, file_format="array_record")
    out.append((corpus, builders.prepared(make) if prepare else builders.construct(make)))
  return out


def pack_report(builder) -> dict | None:
  try:
    with open(builder.builder_config.stats_path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
