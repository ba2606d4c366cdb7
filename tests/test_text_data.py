"""Text corpora (data.source=corpus): mixture proportions, the (seed, step) stream, tokenizer
round trip on the stdlib corpus, TFDS datasets on disk, bad inputs as one line (exit 2),
exact resume after SIGKILL mid-epoch on a text mixture."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, subprocess_env
from sleep_jax import cli, exit_codes
from sleep_jax.config import CorpusConfig, DataConfig
from sleep_jax.data import data_sources, make_train_iterator
from sleep_jax.data.corpus import read_document, scan, stdlib_root

TEXT_TINY = os.path.join(REPO, "experiments", "text_tiny.yaml")


def _letters(path, letter, n_docs, seed):
  rng = np.random.default_rng(seed)
  path.write_text("".join(json.dumps({"text": letter * int(rng.integers(20, 200)) + str(i)}) + "\n"
                        for i in range(n_docs)))
  return str(path)


def _mix_cfg(tmp_path, **kw):
  a = _letters(tmp_path / "a.jsonl", "a", 300, 0)
  b = _letters(tmp_path / "b.jsonl", "b", 100, 1)
  corpora = [CorpusConfig(path=a, format="jsonl", weight=3.0), CorpusConfig(path=b, format="jsonl", weight=1.0)]
  return DataConfig(**{**dict(source="corpus", corpora=corpora, tokenizer="bytes", seq_len=32,
                              data_dir=str(tmp_path / "data"), prefetch=2), **kw})


def test_mixture_proportions_and_the_seed_step_stream(tmp_path):
  cfg = _mix_cfg(tmp_path)
  it = make_train_iterator(cfg, global_batch_size=8, seed=5)
  batches = [next(it) for _ in range(150)]
  rows = np.concatenate([b["tokens"] for b in batches])
  from_a = np.mean([(r == ord("a")).any() for r in rows])
  assert abs(from_a - 0.75) < 0.02, from_a  # weights 3 : 1 (corpus b is 1/3 the size of a)
  # Corpus b has ~360 windows: 300 draws from it wrap past its first epoch without repeating early.
  # Any process count and any resume step see the same global batches.
  halves = [make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=p, process_count=2, start_step=40)
            for p in range(2)]
  for s in range(40, 44):
    got = np.concatenate([next(h)["tokens"] for h in halves])
    np.testing.assert_array_equal(got, batches[s]["tokens"])
  other = next(make_train_iterator(cfg, global_batch_size=8, seed=6))
  assert not np.array_equal(other["tokens"], batches[0]["tokens"])


def test_tokenizer_round_trip_on_the_stdlib_corpus(tmp_path):
  from sleep_jax.data.tokenized import data_tokenizer

  cfg = DataConfig(source="corpus", corpora=[CorpusConfig(format="stdlib", path="json")],
                   tokenizer=str(tmp_path / "tok"), train_tokenizer_vocab=400, seq_len=256,
                   data_dir=str(tmp_path / "data"), eval_fraction=0.2)
  tok = data_tokenizer(cfg)  # trained on the train files (no download)
  assert tok.vocab_size == 400 and tok.eos_id is not None
  corpus = scan(cfg.corpora[0], 0, cfg.eval_fraction)
  files = sorted(f for f in os.listdir(os.path.join(stdlib_root(), "json")) if f.endswith(".py"))
  assert len(corpus.refs["train"]) + len(corpus.refs["eval"]) == len([f for f in files if os.path.getsize(
      os.path.join(stdlib_root(), "json", f))])
  for ref in corpus.refs["eval"]:
    text = read_document(ref)
    assert tok.decode(tok.encode(text)) == text
  # The windows of the train split, unpacked, are the train files' tokens (+ EOS) in order.
  train = data_sources(cfg)["train"][0]
  stream = np.concatenate([w["tokens"][w["segment_ids"] > 0] for w in (train[i] for i in range(len(train)))])
  docs = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
  texts = [read_document(r) for r in corpus.refs["train"]]
  assert [tok.decode(d[:-1]) for d in docs] == texts
  with open(corpus.refs["train"][0][1], encoding="utf-8") as f:
    assert texts[0] == f.read()


def _tfds_dataset(root, texts):
  import tensorflow_datasets as tfds

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"content": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from ((i, {"content": t}) for i, t in enumerate(texts))

  b = TinyText(data_dir=str(root), file_format="array_record")
  b.download_and_prepare(file_format="array_record")
  return str(b.data_path)


def test_tfds_dataset_on_disk(tmp_path):
  texts = [f"document {i}: " + "xyz" * i for i in range(1, 60)]
  path = _tfds_dataset(tmp_path / "tfds", texts)
  cfg = DataConfig(source="corpus", corpora=[CorpusConfig(path=path, format="tfds", field="content")],
                   tokenizer="bytes", seq_len=64, data_dir=str(tmp_path / "data"), eval_fraction=0.1)
  src = data_sources(cfg)
  train = src["train"][0]
  pieces = b"".join(bytes(w["tokens"][w["segment_ids"] > 0].astype(np.uint8))
                    for w in (train[i] for i in range(len(train)))).decode()
  kept = [t for t in texts if t in pieces]
  assert pieces == "".join(kept) and 0 < len(texts) - len(kept) < 20 and len(src["eval"]) > 0


def _text_tiny(tmp_path, corpora, *extra):
  return ["train", TEXT_TINY, f"run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'data'}",
          f"data.corpora={corpora}", "data.tokenizer=bytes", "data.train_tokenizer_vocab=0", "model.vocab_size=256",
          *extra]


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "bin.txt").write_bytes(b"text\0\x01\x02binary")
  (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
  big = tmp_path / "big"
  from sleep_jax.tokenizer import train_bpe_on
  train_bpe_on(iter(["some text to learn from " * 50]), str(big), vocab_size=300, show_progress=False)
  cases = [
      ("[{path: %s}]" % (tmp_path / "missing.txt"), [], "no such file or directory"),
      ("[{path: %s}]" % (tmp_path / "empty.txt"), [], "empty corpus file"),
      ("[{path: %s}]" % (tmp_path / "bin.txt"), [], "binary file (NUL bytes)"),
      ("[{path: %s}]" % (tmp_path / "latin.txt"), [], "not UTF-8 text"),
      ("[{path: %s, format: jsonl}]" % (tmp_path / "nofield.jsonl"), [], "nofield.jsonl:2: no string field 'text'"),
      ("[{path: %s, format: jsonl}]" % (tmp_path / "broken.jsonl"), [], "broken.jsonl:2: malformed JSON"),
      ("[{path: %s, format: tfds}]" % tmp_path, [], "no prepared TFDS dataset"),
      ("[{format: stdlib, weight: -1}]", [], "mixture weights must be positive"),
      ("[{format: stdlib, wieght: 2}]", [], "unknown config key 'data.corpora[0].wieght'"),
      ("[{format: stdlib}]", [f"data.tokenizer={big}"], "'model.vocab_size': 256 < the vocabulary of"),
      ("[{format: stdlib}]", [f"data.tokenizer={tmp_path / 'nope'}"], "no such tokenizer file or directory"),
  ]
  for corpora, extra, want in cases:
    assert cli.main(_text_tiny(tmp_path, corpora, *extra)) == exit_codes.USAGE, want
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and want in lines[0], (want, err[-2000:])
    assert "Traceback" not in err and not os.path.exists(tmp_path / "run")  # nothing written
  # The real program exits 2 too.
  p = subprocess.run([sys.executable, "-m", "sleep_jax.cli", *_text_tiny(tmp_path, cases[2][0])], cwd=REPO,
                     env=subprocess_env(devices=1), capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr[-2000:]


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_sigkill_mid_epoch_on_a_text_mixture_resumes_with_identical_losses(tmp_path):
  a = _letters(tmp_path / "a.jsonl", "a", 400, 0)
  (tmp_path / "code").mkdir()
  for i, f in enumerate(sorted(f for f in os.listdir(os.path.join(stdlib_root(), "json")) if f.endswith(".py"))[:4]):
    (tmp_path / "code" / f"{i}.py").write_text(open(os.path.join(stdlib_root(), "json", f)).read())
  corpora = "[{path: %s, format: jsonl, weight: 1}, {path: %s, weight: 2}]" % (a, tmp_path / "code")
  extra = ["data.seq_len=64", "train.batch_size=8", "train.steps=16", "checkpoint.every=4", "model.d_model=32",
           "train.eval_batches=1", "data.eval_examples=8", "sleep.chunk_len=16", "model.gdn_chunk=16"]
  env = subprocess_env(devices=1)
  args = lambda run: [sys.executable, "-m", "sleep_jax.cli", *_text_tiny(tmp_path, corpora, *extra, f"run_dir={run}")]  # noqa: E731
  ref = subprocess.run(args(tmp_path / "ref"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(args(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while not os.path.isdir(killed / "checkpoints" / "8"):
    assert proc.poll() is None and time.time() - t0 < 300
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = subprocess.run(args(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "resumed from step" in again.stderr, again.stderr[-3000:]
  assert _losses(killed) == _losses(tmp_path / "ref") and len(_losses(killed)) == 16
