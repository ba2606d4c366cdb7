"""sleep_jax.hf.safetensors_io: zero-copy reads, sharded writes, one-line errors on damage.

Expected values come from the `safetensors` library itself (its writer and its raw-bytes
deserialiser) and from huggingface_hub's shard splitter, never from the code under test.
"""

import json
import mmap
import os
import weakref

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

from sleep_jax.hf.safetensors_io import INDEX, SINGLE, CheckpointReader, HFError, write_checkpoint

BF16 = ml_dtypes.bfloat16


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "model.embed_tokens.weight": rng.standard_normal((64, 16)).astype(np.float32),
      "model.layers.0.mlp.up_proj.weight": rng.standard_normal((48, 16)).astype(BF16),
      "model.layers.0.input_layernorm.weight": rng.standard_normal((15,)).astype(BF16),  # odd: unaligned next
      "model.layers.0.mlp.down_proj.weight": rng.standard_normal((16, 48)).astype(np.float32),
      "model.norm.weight": np.ones((16,), np.float16),
      "positions": np.arange(7, dtype=np.int64),
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
  }


def _raw(path):
  """name -> (dtype string, shape, bytes) as the safetensors library itself parses the file."""
  with open(path, "rb") as f:
    return {n: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for n, v in safetensors.deserialize(f.read())}


def _one_line_error(path, match):
  with pytest.raises(HFError, match=match) as e:
    CheckpointReader(path)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_single_file_round_trip(tmp_path):
  ts = _tensors()
  assert write_checkpoint(tmp_path, iter(ts.items())) == [SINGLE]
  assert sorted(os.listdir(tmp_path)) == [SINGLE]
  raw = _raw(tmp_path / SINGLE)
  with CheckpointReader(tmp_path) as r:
    assert sorted(r.names()) == sorted(ts)
    assert r.metadata == {"format": "pt"}
    for name, x in ts.items():
      a = r.array(name)
      assert a.dtype == x.dtype and a.shape == x.shape and r.shape(name) == x.shape
      np.testing.assert_array_equal(a, x)
      assert r.dtype(name) == raw[name][0]
      assert a.tobytes() == raw[name][2]
  assert raw["model.layers.0.mlp.up_proj.weight"][0] == "BF16"
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / SINGLE).st_mode & 0o777 == 0o666 & ~umask


def test_sharded_round_trip_matches_huggingface_hub_split(tmp_path):
  from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

  ts = _tensors(1)
  ts["big"] = np.ones((100, 10), np.float32)  # larger than a shard: alone in its own
  limit = 3000
  files = write_checkpoint(tmp_path, iter(ts.items()), max_shard_bytes=limit)
  split = split_state_dict_into_shards_factory(ts, get_storage_size=lambda x: x.nbytes, max_shard_size=limit,
                                               filename_pattern="model{suffix}.safetensors")
  assert split.is_sharded and files == [*split.filename_to_tensors, INDEX]
  index = json.loads((tmp_path / INDEX).read_text())
  assert index["weight_map"] == split.tensor_to_filename
  assert index["metadata"]["total_size"] == split.metadata["total_size"] == sum(x.nbytes for x in ts.values())
  assert index["metadata"]["total_parameters"] == sum(x.size for x in ts.values())
  assert (tmp_path / INDEX).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
  for f, names in split.filename_to_tensors.items():
    assert sorted(_raw(tmp_path / f)) == sorted(names)
  with CheckpointReader(tmp_path) as r:
    assert sorted(r.names()) == sorted(ts)
    for name, x in ts.items():
      np.testing.assert_array_equal(r.array(name), x)
      assert r.array(name).dtype == x.dtype


def test_writer_holds_at_most_one_shard(tmp_path):
  refs = []

  def produce():
    for i in range(12):
      x = np.full((256,), i, np.float32)  # 1 KiB each; 4 per shard
      refs.append(weakref.ref(x))
      alive = sum(r() is not None for r in refs)
      assert alive <= 5, f"{alive} tensors alive while producing tensor {i}"
      yield f"t{i}", x
      del x

  files = write_checkpoint(tmp_path, produce(), max_shard_bytes=4096)
  assert files[:-1] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_dtype_cast_and_overwrite(tmp_path):
  ts = _tensors(2)
  write_checkpoint(tmp_path, iter(ts.items()), max_shard_bytes=600)
  assert (tmp_path / INDEX).exists()
  (tmp_path / "config.json").write_text("{}")
  write_checkpoint(tmp_path, iter(ts.items()), dtype="bfloat16")
  assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE]  # stale shards and index gone
  with CheckpointReader(tmp_path) as r:
    assert r.dtype("model.embed_tokens.weight") == "BF16" and r.dtype("positions") == "I64"
    np.testing.assert_array_equal(r.array("model.embed_tokens.weight"), ts["model.embed_tokens.weight"].astype(BF16))
  write_checkpoint(tmp_path, iter(ts.items()), max_shard_bytes=600)
  assert SINGLE not in os.listdir(tmp_path)


def test_crash_leaves_nothing_that_looks_complete(tmp_path):
  write_checkpoint(tmp_path, iter(_tensors().items()))

  def failing():
    yield "a", np.zeros((300,), np.float32)
    yield "b", np.zeros((300,), np.float32)
    raise RuntimeError("producer died")

  with pytest.raises(RuntimeError, match="producer died"):
    write_checkpoint(tmp_path, failing(), max_shard_bytes=1500)
  assert os.listdir(tmp_path) == []
  _one_line_error(tmp_path, "no model.safetensors")
  with pytest.raises(HFError, match="written twice"):
    write_checkpoint(tmp_path, [("a", np.zeros(2)), ("a", np.zeros(2))])
  with pytest.raises(HFError, match="no tensors"):
    write_checkpoint(tmp_path, [])


def test_array_is_a_zero_copy_view_of_the_file_map(tmp_path):
  x = np.arange(12 * 8, dtype=np.float32).reshape(12, 8).astype(BF16)
  write_checkpoint(tmp_path, [("pad", np.zeros(3, BF16)), ("w", x)])
  with CheckpointReader(tmp_path) as r:
    a, b = r.array("w"), r.array("w")
    assert np.shares_memory(a, b) and not a.flags.writeable and not a.flags.owndata
    base = a
    while isinstance(base, (np.ndarray, memoryview)):
      base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, mmap.mmap)
    view = a.T.reshape(8, 3, 4)[2:5, 1]  # a transposed/reshaped view; indexing reads only this
    np.testing.assert_array_equal(np.asarray(view, np.float32), x.astype(np.float32).T.reshape(8, 3, 4)[2:5, 1])
    r.release("w")  # pages dropped from RSS; the view still reads the file
    np.testing.assert_array_equal(a, x)
  np.testing.assert_array_equal(a, x)  # views outlive close()


def test_reads_files_written_by_the_safetensors_library(tmp_path):
  rng = np.random.default_rng(3)
  ts = {"f64": rng.standard_normal((3, 2)), "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16), "bf16": rng.standard_normal((2, 3, 3)).astype(BF16),
        "fp8": rng.standard_normal((7,)).astype(ml_dtypes.float8_e4m3fn), "i32": rng.integers(-9, 9, (3,), np.int32),
        "u8": rng.integers(0, 255, (9,), np.uint8), "bool": rng.standard_normal((4,)) > 0}
  save_file(ts, tmp_path / SINGLE, metadata={"format": "np"})
  raw = _raw(tmp_path / SINGLE)
  with CheckpointReader(tmp_path / SINGLE) as r:
    assert r.metadata == {"format": "np"}
    for name, x in ts.items():
      assert r.dtype(name) == raw[name][0] and r.shape(name) == raw[name][1]
      assert r.array(name).tobytes() == raw[name][2]
      np.testing.assert_array_equal(r.array(name), x)
  # And our sharded files are ones the library parses (a second shard and the index included).
  write_checkpoint(tmp_path / "ours", iter(ts.items()), max_shard_bytes=64)
  weight_map = json.loads((tmp_path / "ours" / INDEX).read_text())["weight_map"]
  for name, f in weight_map.items():
    assert _raw(tmp_path / "ours" / f)[name][2] == ts[name].tobytes()


def _write(tmp_path, name="model.safetensors"):
  save_file({"a": np.arange(100, dtype=np.float32), "b": np.ones((4, 4), np.float32)}, tmp_path / name)
  return tmp_path / name


def test_damaged_files_are_one_line_errors(tmp_path):
  _one_line_error(tmp_path / "nope", "no such checkpoint")
  _one_line_error(tmp_path, "no model.safetensors or model.safetensors.index.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  _one_line_error(tmp_path, "convert it to safetensors")

  path = _write(tmp_path)
  data = path.read_bytes()
  path.write_bytes(data[:-10])  # truncated
  msg = _one_line_error(tmp_path, "run past the end of the file")
  assert str(path) in msg and "'" in msg  # names the file and the tensor
  path.write_bytes(data[:5])
  _one_line_error(tmp_path, "no header length")
  path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
  _one_line_error(tmp_path, "damaged safetensors header")
  n = int.from_bytes(data[:8], "little")
  path.write_bytes(data[:8] + b"{" * n + data[8 + n:])  # not JSON
  _one_line_error(tmp_path, "damaged safetensors header")
  header = data[8:8 + n].replace(b"[4,4]", b"[4,5]")  # shape no longer matches the bytes
  path.write_bytes(data[:8] + header + data[8 + n:])
  _one_line_error(tmp_path, r"64 bytes for F32 \[4, 5\]")
  header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
  _one_line_error(tmp_path, "overlap")


def test_index_errors(tmp_path):
  _write(tmp_path, "model-00001-of-00002.safetensors")
  index = {"metadata": {"total_size": 464}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                           "b": "model-00002-of-00002.safetensors"}}
  (tmp_path / INDEX).write_text(json.dumps(index))
  msg = _one_line_error(tmp_path, "model-00002-of-00002.safetensors .* is missing")
  assert INDEX in msg
  index["weight_map"]["b"] = index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
  (tmp_path / INDEX).write_text(json.dumps(index))
  _one_line_error(tmp_path, "maps 'c' to model-00001-of-00002.safetensors, which has no such tensor")
  (tmp_path / INDEX).write_text("{not json")
  _one_line_error(tmp_path, "not a safetensors index")
  del index["weight_map"]["c"]
  (tmp_path / INDEX).write_text(json.dumps(index))
  with CheckpointReader(tmp_path) as r:
    assert sorted(r.names()) == ["a", "b"] and "a" in r and "c" not in r
    with pytest.raises(HFError, match="no tensor 'c'"):
      r.array("c")


def _rss_file_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssFile:"):
        return int(line.split()[1]) * 1024
  pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_slicing_a_view_maps_only_its_pages_and_release_drops_them(tmp_path):
  x = np.ones((1024, 16384), BF16)  # 32 MiB
  write_checkpoint(tmp_path, [("w", x)])
  del x
  with CheckpointReader(tmp_path) as r:
    view = r.array("w").T  # [16384, 1024]; rows of the file are columns here
    before = _rss_file_bytes()
    assert float(np.asarray(view[:, 100:102], np.float32).sum()) == 2 * 16384  # two file rows: 64 KiB
    assert _rss_file_bytes() - before < 4 * 2**20
    assert float(np.asarray(view, np.float32).sum()) == 1024 * 16384
    assert _rss_file_bytes() - before > 30 * 2**20
    r.release("w")
    assert _rss_file_bytes() - before < 4 * 2**20
