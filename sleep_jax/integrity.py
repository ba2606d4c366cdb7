"""Checksums of every file of a checkpoint, written with it and verified before a restore.

A checkpoint step directory holds `sha256.json`: {"files": {relative path: sha256}}. It is
written into orbax's temporary directory just before orbax renames it into place, so a
finished checkpoint carries its checksums; `verify` tells a damaged checkpoint (a listed
file missing, truncated or with a flipped bit) from one that is fine, which is the only
reason a checkpoint is ever moved aside. A checkpoint without the file (written by an older
version, or a process killed in the instant between rename and write) is "unverified" and
restored as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

MANIFEST = "sha256.json"
# Small files orbax (re)writes at the step's top level while renaming it into place (commit
# timestamp, success marker): listed afterwards, by `add_late_files`.
LATE = ("_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str, *, skip: tuple[str, ...] = ()) -> None:
  files = {rel: file_sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir) if rel not in skip}
  _write(step_dir, files)


def add_late_files(step_dir: str) -> None:
  """List the LATE files of a step that orbax has finished (no manifest yet: list everything)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    write_manifest(step_dir)
    return
  with open(path) as f:
    files = json.load(f)["files"]
  late = {n: file_sha256(os.path.join(step_dir, n)) for n in LATE if os.path.isfile(os.path.join(step_dir, n))}
  if any(files.get(n) != d for n, d in late.items()):
    _write(step_dir, {**files, **late})


def _write(step_dir: str, files: dict[str, str]) -> None:
  path = os.path.join(step_dir, MANIFEST)
  with open(path + ".tmp", "w") as f:
    json.dump({"algorithm": "sha256", "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> Optional[str]:
  """None if every listed file is there with its checksum (or there is no list); else why not."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    if not isinstance(files, dict) or not files:
      return f"{MANIFEST} lists no files"
  except (ValueError, KeyError, TypeError) as e:  # OSError (EIO, ...) is not damage: it propagates
    return f"{MANIFEST} is unreadable ({type(e).__name__})"
  for rel, digest in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    if file_sha256(full) != digest:
      return f"{rel} fails its checksum"
  return None
