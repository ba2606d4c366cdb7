"""Data pipeline: TFDS build == the task generators, a deterministic (seed, step) stream
that is the same for any process count and after resuming, text corpora, errors, caching.

Expected values come from `tasks.generate` and the raw text bytes, never from the pipeline.
"""

import json
import os
import threading

import numpy as np
import pytest

from sleep_jax.config import DataConfig
from sleep_jax.data import (DataError, data_sources, dataset_info, make_eval_batches,
                            make_train_iterator)
from sleep_jax.data import tasks

OPTS = {"K": 4, "W": 8, "steps": 4}  # T = K*W + 1 + K = 37
N_TRAIN, N_EVAL, B = 40, 11, 8  # an epoch is 5 global batches


def _cfg(tmp_path, **kw):
  base = dict(task="rule110", task_options=dict(OPTS), eval_task_options={"steps": 6},
              seq_len=40, train_examples=N_TRAIN, eval_examples=N_EVAL,
              data_dir=str(tmp_path / "data"), prefetch=2)
  return DataConfig(**{**base, **kw})


def _expected(split, n, opts):
  return [tasks.generate("rule110", split, i, 0, opts) for i in range(n)]


def _dataset_dirs(root):
  return sorted(d for d in os.listdir(os.path.join(root, "sleep_jax_task")) if not d.startswith("."))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_build_matches_generate(tmp_path):
  cfg = _cfg(tmp_path)
  src = data_sources(cfg)
  eval_opts = {**OPTS, "steps": 6}
  for split, n, opts in (("train", N_TRAIN, OPTS), ("eval", N_EVAL, eval_opts)):
    assert len(src[split]) == n
    for i, want in enumerate(_expected(split, n, opts)):
      got = src[split][i]
      np.testing.assert_array_equal(got["tokens"], want["tokens"])
      np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
      assert got["difficulty"] == opts["steps"]
  info = dataset_info(cfg)
  assert (info.vocab_size, info.example_len, info.seq_len) == (tasks.get_task("rule110").VOCAB_SIZE, 37, 40)

  # Eval batches: fixed index order, right-padded to seq_len, last batch padded with invalid rows.
  want = _expected("eval", N_EVAL, eval_opts)
  batches = list(make_eval_batches(cfg, batch_size=4))
  assert len(batches) == 3
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows["tokens"].shape == (12, 40) and rows["tokens"].dtype == np.int32
  np.testing.assert_array_equal(rows["valid"], [True] * N_EVAL + [False])
  np.testing.assert_array_equal(rows["difficulty"][:N_EVAL], 6)
  for i, ex in enumerate(want):
    np.testing.assert_array_equal(rows["tokens"][i], np.pad(ex["tokens"], (0, 3)))
    np.testing.assert_array_equal(rows["loss_mask"][i], np.pad(ex["loss_mask"], (0, 3)))
  assert not rows["loss_mask"][N_EVAL:].any() and not rows["tokens"][N_EVAL:].any()
  assert len(list(make_eval_batches(cfg, batch_size=4, num_batches=2))) == 2
  # Two processes each get half of every eval batch, the same number of batches.
  halves = [list(make_eval_batches(cfg, batch_size=4, process_index=p, process_count=2)) for p in (0, 1)]
  for s, full in enumerate(batches):
    np.testing.assert_array_equal(np.concatenate([h[s]["tokens"] for h in halves]), full["tokens"])


def test_train_stream_is_deterministic_for_resume_and_process_count(tmp_path):
  cfg = _cfg(tmp_path)
  kw = dict(global_batch_size=B, seed=3)
  ref = _take(make_train_iterator(cfg, **kw), 6)
  assert ref[0]["tokens"].shape == (B, 40) and ref[0]["tokens"].dtype == np.int32
  assert set(ref[0]) == {"tokens", "loss_mask"}

  _assert_same(_take(make_train_iterator(cfg, start_step=3, **kw), 3), ref[3:])

  first = make_train_iterator(cfg, **kw)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  assert state["step"] == 3
  restored = make_train_iterator(cfg, **kw)
  _take(restored, 5)  # somewhere else entirely, then rewound
  restored.set_state(state)
  _assert_same(_take(restored, 3), ref[3:])

  for P in (2, 4):
    local = [_take(make_train_iterator(cfg, process_index=p, process_count=P, **kw), 6) for p in range(P)]
    for s in range(6):
      assert local[0][s]["tokens"].shape == (B // P, 40)
      for k in ("tokens", "loss_mask"):
        np.testing.assert_array_equal(np.concatenate([local[p][s][k] for p in range(P)]), ref[s][k])
  # A state saved on 4 processes restores on 1 (the state names the global step only).
  it = make_train_iterator(cfg, process_index=1, process_count=4, **kw)
  _take(it, 2)
  one = make_train_iterator(cfg, **kw)
  one.set_state(it.get_state())
  _assert_same(_take(one, 4), ref[2:])
  with pytest.raises(DataError, match="global_batch_size"):
    make_train_iterator(cfg, global_batch_size=16, seed=3).set_state(state)


def test_epochs_are_fresh_permutations(tmp_path):
  cfg = _cfg(tmp_path)
  index = {ex["tokens"].tobytes(): i for i, ex in enumerate(_expected("train", N_TRAIN, OPTS))}
  assert len(index) == N_TRAIN

  def order(seed):
    batches = _take(make_train_iterator(cfg, global_batch_size=B, seed=seed), 3 * N_TRAIN // B)
    rows = np.concatenate([b["tokens"][:, :37] for b in batches])
    return [index[r.tobytes()] for r in rows]  # KeyError: a row that is no train example

  seq = order(0)
  epochs = [seq[e * N_TRAIN:(e + 1) * N_TRAIN] for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(N_TRAIN))  # each epoch: every example exactly once
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(N_TRAIN))
  assert order(0) == seq  # still deterministic
  assert order(1)[:N_TRAIN] != epochs[0]  # and the seed matters


def test_text_corpus_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  words = ["sleep", "wake", "dream", "chunk", "state", "weights", "night", "day", "ünïcode"]
  text = " ".join(rng.choice(words, size=400)).encode()
  path = tmp_path / "corpus.txt"
  path.write_bytes(text)
  L = 32
  cfg = _cfg(tmp_path, source="text", text_path=str(path), seq_len=L, eval_examples=5)
  n = len(text) // L
  n_eval = min(5, n // 10)
  src = data_sources(cfg)
  assert (len(src["train"]), len(src["eval"])) == (n - n_eval, n_eval)
  decode = lambda toks: bytes(np.asarray(toks, np.uint8))
  train = b"".join(decode(src["train"][i]["tokens"]) for i in range(n - n_eval))
  assert train == text[:(n - n_eval) * L]
  ev = list(make_eval_batches(cfg, batch_size=n_eval))
  assert b"".join(decode(t) for t in ev[0]["tokens"]) == text[(n - n_eval) * L:n * L]
  windows = {text[i * L:(i + 1) * L] for i in range(n - n_eval)}
  batch = next(make_train_iterator(cfg, global_batch_size=4, seed=0))
  assert all(decode(row) in windows for row in batch["tokens"])
  assert batch["loss_mask"].all()
  assert dataset_info(cfg).vocab_size == 256

  missing = _cfg(tmp_path, source="text", text_path=str(tmp_path / "nope" / "x.txt"))
  with pytest.raises(DataError) as e:
    data_sources(missing)
  assert str(e.value) == f"data.text_path: no such file: {tmp_path / 'nope' / 'x.txt'}"


def test_clear_errors(tmp_path):
  cases = [(dict(task="nope"), "data.task: unknown task 'nope'"),
           (dict(task_options={"bogus": 1}), "data.task_options: unknown option 'bogus'"),
           (dict(eval_task_options={"bogus": 1}), "data.eval_task_options: unknown option 'bogus'"),
           (dict(task_options={"W": 2}), "data.task_options: rule110 needs"),
           (dict(eval_task_options={"steps": -1}), "data.eval_task_options: rule110 needs"),
           (dict(seq_len=36), "data.seq_len=36 is too short: task 'rule110' examples need 37"),
           (dict(source="text", text_path=None), "data.text_path: not set")]
  for kw, msg in cases:
    with pytest.raises(DataError) as e:
      data_sources(_cfg(tmp_path, **kw))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(DataError, match=r"^data\.data_dir: .*a_file"):
    data_sources(_cfg(tmp_path, data_dir=str(blocker / "sub")))
  with pytest.raises(DataError, match="train.batch_size"):
    make_train_iterator(_cfg(tmp_path, train_examples=8, eval_examples=2), global_batch_size=6,
                        seed=0, process_count=4)


def test_cache_reuse_concurrency_and_identity(tmp_path, monkeypatch):
  calls = []
  real = tasks.generate
  monkeypatch.setattr(tasks, "generate", lambda *a, **k: calls.append(a) or real(*a, **k))
  cfg = _cfg(tmp_path, train_examples=16, eval_examples=4)
  # Two builders racing on an empty data_dir: one builds, the other waits and reads.
  results, errors = [], []
  run = lambda: _try(lambda: results.append(len(data_sources(cfg)["train"])), errors)
  threads = [threading.Thread(target=run) for _ in range(2)]
  [t.start() for t in threads]
  [t.join() for t in threads]
  assert not errors and results == [16, 16]
  assert len(calls) == 16 + 4 + 2  # built exactly once (+ one option check per split)
  root = cfg.data_dir
  names = _dataset_dirs(root)
  assert [n.split("-")[1] for n in names] == ["eval", "train"]  # one build per split
  version_dirs = [os.path.join(root, "sleep_jax_task", n, "1.0.0") for n in names]
  mtimes = lambda: {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                    for d in version_dirs for f in os.listdir(d)}
  before = mtimes()

  data_sources(cfg)  # cached: no generate call, no file rewritten
  assert len(calls) == 22
  assert mtimes() == before

  # Each split is rebuilt only when something its records depend on changes. Train options
  # reach the eval split too (eval options are merged over them); eval options and
  # eval_examples never touch the train split, and train_examples never the eval split.
  def new_builds(**kw):
    n = len(_dataset_dirs(root))
    calls.clear()
    data_sources(_cfg(tmp_path, **{"train_examples": 16, "eval_examples": 4, **kw}))
    return len(_dataset_dirs(root)) - n, len(calls)

  assert new_builds(eval_task_options={"steps": 7}) == (1, 4 + 1)
  assert new_builds(eval_examples=5) == (1, 5 + 1)
  assert new_builds(train_examples=17) == (1, 17 + 1)
  assert new_builds(task_options={**OPTS, "steps": 5}) == (1, 16 + 1)  # eval overrides steps
  assert new_builds(task_options={**OPTS, "W": 7}) == (2, 16 + 4 + 2)
  assert mtimes() == before  # the first builds were never rewritten


def _try(fn, errors):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 (reported by the main thread)
    errors.append(e)


def test_builder_constructed_mid_build_is_not_returned(tmp_path):
  # The race CI once hit: a builder constructed while another thread was still building
  # sees no splits, even though the build is finished by the time it checks the disk.
  from sleep_jax.data.builders import prepared, task_builders
  cfg = _cfg(tmp_path, train_examples=8, eval_examples=2)
  stale = task_builders(cfg, prepare=False)["train"]  # constructed before any build
  fresh = task_builders(cfg)["train"]  # builds
  assert not stale.info.splits and fresh.info.splits["train"].num_examples == 8
  makes = iter([lambda: stale])
  got = prepared(lambda: next(makes, lambda: task_builders(cfg, prepare=False)["train"])())
  assert got is not stale and got.info.splits["train"].num_examples == 8


def test_two_processes_building_at_once(tmp_path):
  # Real processes (flock is per process): both must end up reading one finished build.
  import subprocess
  import sys
  code = ("import sys; from sleep_jax.config import DataConfig; from sleep_jax.data import data_sources;"
          "cfg = DataConfig(task_options={'K': 4, 'W': 8, 'steps': 4}, seq_len=40, train_examples=1500,"
          " eval_examples=10, data_dir=sys.argv[1]); print(len(data_sources(cfg)['train']))")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-1] == "1500"
  for name in _dataset_dirs(str(tmp_path)):  # one build per split, and no leftovers
    assert os.listdir(os.path.join(tmp_path, "sleep_jax_task", name)) == ["1.0.0"]
  assert len(_dataset_dirs(str(tmp_path))) == 2


def test_split_builds_stay_disjoint(tmp_path):
  # The splits are built separately, but membership is decided by each example's own tokens
  # (tasks.split_of), so even with identical options no sequence is in both.
  cfg = _cfg(tmp_path, task_options={"K": 1, "W": 4, "steps": 1}, eval_task_options={}, seq_len=10,
             train_examples=64, eval_examples=16)
  src = data_sources(cfg)
  seqs = {s: {src[s][i]["tokens"].tobytes() for i in range(len(src[s]))} for s in ("train", "eval")}
  assert seqs["train"].isdisjoint(seqs["eval"])
  assert all(tasks.split_of(np.frombuffer(t, np.int32)) == "eval" for t in seqs["eval"])
