"""Hugging Face safetensors checkpoints: read tensor by tensor from memory maps, write in shards.

Reading parses the safetensors header here (8-byte little-endian length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw little-endian bytes) because the library hands
numpy callers copies, and bf16 not at all. `CheckpointReader.array(name)` is a zero-copy,
read-only view into the file's memory map, so a loader can take a transposed or reshaped
view and read only the slices one device needs:

    with CheckpointReader(hf_dir) as ckpt:
      w_DF = ckpt.array("model.layers.0.mlp.up_proj.weight").T        # no bytes read yet
      x = jax.make_array_from_callback(w_DF.shape, sharding, lambda idx: np.asarray(w_DF[idx], dtype))
      ckpt.release("model.layers.0.mlp.up_proj.weight")                  # drop its pages from RSS

Writing goes through `safetensors.numpy.save_file` (which writes ml_dtypes bf16/fp8 as
BF16/F8_*) one shard at a time, under temporary names, so a crash never leaves a directory
that looks like a complete checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Iterable

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER = 100 * 2**20  # the library's own limit; a larger length is damage, not a header

# safetensors dtype string -> numpy dtype (ml_dtypes supplies bf16 and the fp8 formats).
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "C64": np.dtype(np.complex64),
}


class HFError(ValueError):
  """A checkpoint a user can fix (missing, damaged, inconsistent): one line naming the file/tensor."""


def _one_line(s: object) -> str:
  return " ".join(str(s).split())


class _Shard:
  """One .safetensors file: its validated header and a read-only memory map of the whole file."""

  def __init__(self, path: str):
    self.path = path
    try:
      f = open(path, "rb")
    except OSError as e:
      raise HFError(f"{path}: cannot open ({_one_line(e.strerror or e)})") from None
    with f:
      size = os.fstat(f.fileno()).st_size
      head = f.read(8)
      if len(head) < 8:
        raise HFError(f"{path}: not a safetensors file ({size} bytes, no header length)")
      n = int.from_bytes(head, "little")
      if n > _MAX_HEADER or 8 + n > size:
        raise HFError(f"{path}: damaged safetensors header (length {n}, file {size} bytes)")
      try:
        header = json.loads(f.read(n).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: damaged safetensors header ({_one_line(e)})") from None
      self.data_start = 8 + n
      self.tensors = self._validate(header, size - self.data_start)
      # Mapping the file costs nothing until a page is touched; pages of a read-only file map
      # can be dropped again (release) because the file still holds them.
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    self._bytes = np.frombuffer(self._map, np.uint8) if self._map is not None else np.zeros(0, np.uint8)

  def _validate(self, header, data_len: int) -> dict:
    if not isinstance(header, dict):
      raise HFError(f"{self.path}: damaged safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
      raise HFError(f"{self.path}: damaged safetensors header (__metadata__ is not an object)")
    self.metadata = meta or {}
    out, spans = {}, []
    for name, info in header.items():
      where = f"{self.path}: tensor {name!r}"
      try:
        dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
      except (TypeError, KeyError, ValueError):
        raise HFError(f"{where}: damaged header entry {_one_line(json.dumps(info))[:200]}") from None
      if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
        raise HFError(f"{where}: bad shape {shape} or data_offsets [{begin}, {end}]")
      if end > data_len:
        raise HFError(f"{where}: data_offsets [{begin}, {end}] run past the end of the file "
                      f"({data_len} data bytes; truncated?)")
      if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise HFError(f"{where}: {end - begin} bytes for {dtype} {shape} "
                      f"(expected {math.prod(shape) * DTYPES[dtype].itemsize})")
      out[name] = (dtype, tuple(shape), begin, end)
      spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
      if b1 < e0:
        raise HFError(f"{self.path}: tensors {a!r} and {b!r} overlap")
    return out

  def array(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self.tensors[name]
    if dtype not in DTYPES:
      raise HFError(f"{self.path}: tensor {name!r} has dtype {dtype}, which numpy cannot represent")
    raw = self._bytes[self.data_start + begin:self.data_start + end]
    # safetensors packs tensors back to back, so a view may be unaligned; numpy handles that.
    return raw.view(DTYPES[dtype].newbyteorder("<")).reshape(shape)

  def release(self, name: str) -> None:
    if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):  # (not on every OS)
      return
    _, _, begin, end = self.tensors[name]
    lo = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = self.data_start + end
    if hi > lo:
      self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class CheckpointReader:
  """The tensors of a Hugging Face directory (model.safetensors, or an index and its shards).

  `hf_dir` may also name a .safetensors file or an index .json directly. Every header is read
  and validated up front (cheap: headers only); tensor bytes are read when a view is indexed.
  Views stay valid after close(): the mapping goes away with the last view.
  """

  def __init__(self, hf_dir: str | os.PathLike):
    path = os.fspath(hf_dir)
    self.path = path
    if os.path.isdir(path):
      if os.path.isfile(os.path.join(path, SINGLE)):
        files = {None: os.path.join(path, SINGLE)}
      elif os.path.isfile(os.path.join(path, INDEX)):
        files = self._read_index(os.path.join(path, INDEX))
      else:
        bins = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                if os.path.exists(os.path.join(path, f))]
        hint = f" (it has {bins[0]}: convert it to safetensors first)" if bins else ""
        raise HFError(f"{path}: no {SINGLE} or {INDEX}{hint}")
    elif os.path.isfile(path) and path.endswith(".json"):
      files = self._read_index(path)
    elif os.path.isfile(path):
      files = {None: path}
    else:
      raise HFError(f"{path}: no such checkpoint directory or file")
    self._shards = {f: _Shard(f) for f in sorted(set(files.values()))}  # shard 1, 2, ...: names() order
    self._where: dict[str, _Shard] = {}
    if None in files:  # one file: its header is the list of tensors
      shard = self._shards[files[None]]
      self._where = {n: shard for n in shard.tensors}
    else:
      for name, f in files.items():
        if name not in self._shards[f].tensors:
          raise HFError(f"{self._index}: maps {name!r} to {os.path.basename(f)}, which has no such tensor")
        self._where[name] = self._shards[f]
    self.metadata = next(iter(self._shards.values())).metadata if self._shards else {}

  def _read_index(self, index: str) -> dict:
    self._index = index
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise TypeError
    except OSError as e:
      raise HFError(f"{index}: cannot read ({_one_line(e.strerror or e)})") from None
    except (ValueError, KeyError, TypeError):
      raise HFError(f"{index}: not a safetensors index (needs a weight_map of tensor -> file)") from None
    root = os.path.dirname(index)
    for name, f in weight_map.items():
      if not os.path.isfile(os.path.join(root, f)):
        raise HFError(f"{index}: shard {f} (for {name!r}) is missing")
    return {name: os.path.join(root, f) for name, f in weight_map.items()}

  def _shard(self, name: str) -> _Shard:
    try:
      return self._where[name]
    except KeyError:
      raise HFError(f"{self.path}: no tensor {name!r}") from None

  def names(self) -> list[str]:
    """Tensor names in storage order (file, then offset): reading in this order is sequential."""
    order = {s: i for i, s in enumerate(self._shards.values())}
    return sorted(self._where, key=lambda n: (order[self._where[n]], self._where[n].tensors[n][2]))

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shard(name).tensors[name][1]

  def dtype(self, name: str) -> str:
    """The safetensors dtype string: "BF16", "F32", ..."""
    return self._shard(name).tensors[name][0]

  def nbytes(self, name: str) -> int:
    _, _, begin, end = self._shard(name).tensors[name]
    return end - begin

  def total_bytes(self) -> int:
    return sum(self.nbytes(n) for n in self._where)

  def array(self, name: str) -> np.ndarray:
    """A zero-copy read-only view of the tensor in its file dtype (bf16 as ml_dtypes.bfloat16)."""
    return self._shard(name).array(name)

  def release(self, name: str) -> None:
    """Drop the tensor's pages from this process's resident memory (they stay in the page
    cache). Call after placing a tensor so peak RSS stays near one tensor, not the file."""
    self._shard(name).release(name)

  def close(self) -> None:
    # Views handed out keep their mapping alive; forgetting ours is all close() can safely do.
    self._shards, self._where = {}, {}

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_ML_FLOATS = {v for k, v in DTYPES.items() if k in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")}


def _is_float(dt: np.dtype) -> bool:
  # ml_dtypes' floats are numpy kind "V", not np.floating.
  return dt.kind == "f" or dt in _ML_FLOATS


def _cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
  # Only floating tensors change dtype: integer buffers (positions, ids) keep theirs.
  if dtype is not None and _is_float(x.dtype) and x.dtype != dtype:
    x = x.astype(dtype)
  return x if x.flags.c_contiguous else x.copy(order="C")  # (ascontiguousarray makes scalars 1-d)


def write_checkpoint(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], *,
                     max_shard_bytes: int = 2**31, dtype=None, metadata: dict | None = {"format": "pt"}) -> list[str]:
  """Write (name, array) pairs, produced lazily, as transformers' `save_pretrained` does.

  One `model.safetensors` when everything fits in one shard of `max_shard_bytes`, else
  `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (metadata.total_size,
  weight_map). Shards are cut as huggingface_hub cuts them: in order, a new shard when the next
  tensor would overflow, a tensor larger than the limit alone in its own. At most one shard is
  held in memory. `dtype` (e.g. "bfloat16") casts floating tensors. Files are written under
  temporary names and renamed at the end, the index (or the single file) last; an earlier
  checkpoint in out_dir is replaced, other files (config.json, tokenizer) are left alone.
  Returns the written file names.
  """
  out = os.fspath(out_dir)
  os.makedirs(out, exist_ok=True)
  if dtype is not None:
    dtype = np.dtype(dtype)
  if metadata is not None:
    metadata = {str(k): str(v) for k, v in metadata.items()}
  # The directory must stop looking complete before any new bytes land in it.
  for f in (INDEX, SINGLE):
    if os.path.exists(os.path.join(out, f)):
      os.remove(os.path.join(out, f))
  from safetensors.numpy import save_file

  tmp_names: list[list[str]] = []  # per written shard: its tensor names, in order
  tmp = lambda i: os.path.join(out, f".model-{i + 1:05d}.safetensors.tmp{os.getpid()}")  # noqa: E731

  umask = os.umask(0)
  os.umask(umask)

  def flush(shard: dict) -> None:
    save_file(shard, tmp(len(tmp_names)), metadata=metadata)
    # The library creates 0600 files; a checkpoint on a shared disk wants the usual umask.
    os.chmod(tmp(len(tmp_names)), 0o666 & ~umask)
    tmp_names.append(list(shard))

  sizes: dict[str, int] = {}
  current, current_bytes, total_bytes, total_params = {}, 0, 0, 0
  try:
    for name, x in tensors:
      if name in sizes:
        raise HFError(f"{out}: tensor {name!r} written twice")
      x = _cast(np.asarray(x), dtype)
      sizes[name] = x.nbytes
      total_bytes += x.nbytes
      total_params += x.size
      if x.nbytes > max_shard_bytes:
        flush({name: x})
        continue
      if current and current_bytes + x.nbytes > max_shard_bytes:
        flush(current)
        current, current_bytes = {}, 0
      current[name] = x
      current_bytes += x.nbytes
      del x
    if not sizes:
      raise HFError(f"{out}: no tensors to write")
    if current:
      flush(current)
    current = {}
  except BaseException:
    for i in range(len(tmp_names) + 1):  # +1: a shard save_file was writing when it failed
      _remove(tmp(i))
    raise

  n = len(tmp_names)
  if n == 1:
    final = [SINGLE]
    _remove_stale_shards(out, keep=())
    os.replace(tmp(0), os.path.join(out, SINGLE))
    return final
  final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  _remove_stale_shards(out, keep=final)
  for i, f in enumerate(final):
    os.replace(tmp(i), os.path.join(out, f))
  index = {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
           "weight_map": {name: final[i] for i, names in enumerate(tmp_names) for name in names}}
  with open(os.path.join(out, INDEX + ".tmp"), "w", encoding="utf-8") as f:
    f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
  os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))
  return final + [INDEX]


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _remove_stale_shards(out: str, keep) -> None:
  for f in os.listdir(out):
    if _SHARD_RE.fullmatch(f) and f not in keep:
      os.remove(os.path.join(out, f))
