"""sleep_jax.tokenizer: byte-level BPE training, both backends, the CLI, one-line errors, and
transformers loading what we write (where transformers is importable, or SLEEP_JAX_HF_PYTHON
names an interpreter that has it)."""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax.cli import main
from sleep_jax.tokenizer import TokenizerError, load_tokenizer, train_bpe

STDLIB = os.path.dirname(os.__file__)
# A small deterministic corpus: a stdlib package directory plus a named module.
CORPUS = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "argparse.py")]
TEXTS = ["def f(x):\n    return {'a': x}  # comment\n",
         "héllo wörld  ∑ 日本語 🙂\n\ttabs and  spaces  ",
         "Ünïcödé — “quotes” ‘and’ emoji 👩‍👩‍👧 …", "", " leading space", "\r\nwindows\r\n", "\x00\x7f nul"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("bpe")
  train_bpe(CORPUS, str(out), vocab_size=1000, show_progress=False)
  return str(out)


def test_train_bpe_round_trip(bpe_dir, tmp_path):
  tok = load_tokenizer(bpe_dir)
  assert tok.backend == "tokenizers" and tok.vocab_size == 1000
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2) and tok.eos_ids == (1,)
  assert not tok.add_bos_default
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.decode([tok.bos_id, *ids], skip_special=False) == "<|bos|>" + text
  code = open(CORPUS[1], encoding="utf-8").read()[:3000]
  assert len(tok.encode(code)) < len(code) / 2  # it learned merges from the corpus
  config = json.load(open(os.path.join(bpe_dir, "tokenizer_config.json")))
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
  assert config["model_max_length"] > 0
  # Deterministic: the same corpus gives the same tokenizer.
  again = train_bpe(CORPUS, str(tmp_path), vocab_size=1000, show_progress=False)
  assert open(os.path.join(bpe_dir, "tokenizer.json")).read() == open(tmp_path / "tokenizer.json").read()
  assert again.encode(code) == tok.encode(code)


def test_load_from_file_and_save(bpe_dir, tmp_path):
  tok = load_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
  assert tok.eos_id == 1
  assert sorted(tok.save(str(tmp_path / "export"))) == ["tokenizer.json", "tokenizer_config.json"]
  back = load_tokenizer(str(tmp_path / "export"))
  assert back.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and back.pad_id == 2
  # A lone tokenizer.json gets a tokenizer_config.json naming its specials.
  lone = tmp_path / "lone"
  lone.mkdir()
  (lone / "tokenizer.json").write_bytes(open(os.path.join(bpe_dir, "tokenizer.json"), "rb").read())
  t = load_tokenizer(str(lone / "tokenizer.json"))
  assert t.bos_id is None  # nothing names the specials
  (lone / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
  (lone / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
  t = load_tokenizer(str(lone))
  assert (t.bos_id, t.eos_id, t.eos_ids) == (0, 2, (2, 1))  # generation_config first, as generate() uses it
  t.save(str(tmp_path / "lone_out"))
  config = json.load(open(tmp_path / "lone_out" / "tokenizer_config.json"))
  assert config["bos_token"] == "<|bos|>" and config["eos_token"] == "<|pad|>"


def test_special_tokens_map_wins_over_tokenizer_config(bpe_dir, tmp_path):
  for f in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / f).write_bytes(open(os.path.join(bpe_dir, f), "rb").read())
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
  assert load_tokenizer(str(tmp_path)).eos_id == 2


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  out = tmp_path_factory.mktemp("sp")
  # identity normalisation, no dummy prefix, byte fallback: a lossless sentencepiece model.
  spm.SentencePieceTrainer.train(input=CORPUS[1], model_prefix=str(out / "tokenizer"), vocab_size=600,
                                 model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                 normalization_rule_name="identity", add_dummy_prefix=False,
                                 remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
  return str(out)


def test_sentencepiece_backend(sp_dir, tmp_path):
  tok = load_tokenizer(sp_dir)
  assert tok.backend == "sentencepiece" and tok.vocab_size == 600
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)  # sentencepiece's defaults; no pad
  for text in TEXTS[:4]:
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 1 and tok.decode(ids) == text
    assert tok.decode(ids + [2], skip_special=False) == "<s>" + text + "</s>"
  assert tok.save(str(tmp_path)) == ["tokenizer.model"]
  assert load_tokenizer(str(tmp_path / "tokenizer.model")).encode(TEXTS[0]) == tok.encode(TEXTS[0])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>", "add_bos_token": True}))
  t = load_tokenizer(str(tmp_path))
  assert t.eos_id == 1 and t.add_bos_default


def test_cli_train(tmp_path, capsys):
  out = tmp_path / "tok"
  assert main(["tokenizer", "train", *CORPUS, str(out), "--vocab-size", "700", "--min-frequency", "3"]) == 0
  printed = capsys.readouterr().out
  assert "vocabulary: 700 tokens" in printed and "round trip: ok" in printed
  assert load_tokenizer(str(out)).vocab_size == 700
  with pytest.raises(SystemExit) as e:
    main(["tokenizer", "train", "--help"])
  assert e.value.code == 0 and "--vocab-size" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  r = subprocess.run([sys.executable, "-m", "sleep_jax.cli", "tokenizer", "train", str(tmp_path / "none.txt"),
                      str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
  assert r.stderr.startswith("error: ") and "none.txt: no such corpus file" in r.stderr


def _error(fn, *args, match, **kw):
  with pytest.raises(TokenizerError, match=match) as e:
    fn(*args, **kw)
  assert "\n" not in str(e.value)


def test_bad_corpus_and_tokenizer_files(tmp_path, capsys):
  out = str(tmp_path / "out")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("  \n\n")
  (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02\xff binary")
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
  train = lambda *p, **kw: train_bpe([str(tmp_path / x) for x in p], out, show_progress=False, **kw)  # noqa: E731
  _error(train, "missing.txt", match="missing.txt: no such corpus")
  _error(train, "empty.txt", match="empty.txt: empty corpus file")
  _error(train, "blank.txt", match="blank.txt: empty corpus file")
  _error(train, "bin.txt", match="bin.txt: binary file")
  _error(train, "latin1.txt", match="latin1.txt: not UTF-8")
  _error(train, "bad.jsonl", match=r'bad.jsonl:2: expected a JSON object with a string "text" field')
  _error(train_bpe, CORPUS, out, vocab_size=100, match="below the byte alphabet")
  # In a directory, binary files are skipped with a warning; nothing usable left is an error.
  d = tmp_path / "tree"
  (d / "sub").mkdir(parents=True)
  (d / "sub" / "bin.txt").write_bytes(b"\x00\x00")
  (d / "__init__.py").write_text("")
  (d / "image.png").write_bytes(b"\x89PNG")
  _error(train, "tree", match="the corpus holds no text")
  assert "warning: skipping" in capsys.readouterr().err
  (d / "sub" / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS * 20))
  assert train("tree", vocab_size=300).decode(load_tokenizer(out).encode(TEXTS[1])) == TEXTS[1]
  _error(train, "tree/image.png", match="image.png: not UTF-8")
  # Tokenizer files.
  _error(load_tokenizer, str(tmp_path / "nope"), match="nope: no such tokenizer")
  _error(load_tokenizer, str(d / "sub"), match="no tokenizer.json or tokenizer.model")
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
  _error(load_tokenizer, str(tmp_path), match="tokenizer.json: not a tokenizers JSON file")
  (tmp_path / "x.model").write_bytes(b"not a model")
  _error(load_tokenizer, str(tmp_path / "x.model"), match="x.model: not a sentencepiece model")
  good = tmp_path / "good"
  train_bpe(CORPUS[1:], str(good), vocab_size=300, show_progress=False)
  (good / "tokenizer_config.json").write_text("{oops")
  _error(load_tokenizer, str(good), match="tokenizer_config.json: unreadable JSON")


_HF_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.stdin.read())
print(json.dumps({"ids": [tok(t)["input_ids"] for t in texts],
                  "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
                  "specials": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]}))
"""


def test_transformers_loads_our_tokenizer_identically(bpe_dir):
  ours = load_tokenizer(bpe_dir)
  texts = TEXTS + [open(CORPUS[1], encoding="utf-8").read()[:2000]]
  hf_python = os.environ.get("SLEEP_JAX_HF_PYTHON")
  if hf_python:  # an interpreter with transformers (e.g. /work/venv-hf/bin/python)
    r = subprocess.run([hf_python, "-c", _HF_SCRIPT, bpe_dir], input=json.dumps(texts), capture_output=True,
                       text=True, timeout=600, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
  else:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    got = {"ids": [tok(t)["input_ids"] for t in texts], "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
           "specials": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]}
  assert got["ids"] == [ours.encode(t) for t in texts]
  assert got["decoded"] == texts
  assert got["specials"] == [ours.bos_id, ours.eos_id, ours.pad_id]
