"""k-hop retrieval on a random functional graph (the paper's "Depo" task).

Layout (L = chunk_len; C = n_chunks consolidation chunks):

  [u > v u > v ... PAD]  x C     ?  start  hk  answer

Every node has exactly one successor, so k hops from any node are always defined. With
graph="function" (the paper's) successors are drawn uniformly (self-loops allowed): a random
function, whose k-step images crowd onto its cycles, so guessing a k >= 2 answer is often
right. graph="permutation" makes the successor map a random permutation: the k-hop answer is
then uniform over the nodes (chance 1/n_nodes at every k), a cleaner test of composition.
The n_nodes edges are shuffled and split as evenly as possible over the C chunks, whole
edges only (an edge cut by an eviction would be a different, harder task), PAD filling each
chunk's tail. The query comes only after the last eviction: the start node and a hop-count
token hk (one token per k, so k is not spelled in digits); the single answer token is the
node reached.

Difficulty is `hops`. For training on a range, leave hops=None and k is drawn uniformly
from [hops_min, hops_max] for every example (the paper trains on k in 1..16); set hops to
evaluate one depth. T = C*L + 4 does not depend on k, so mixed-k batches are rectangular.
Defaults are paper scale: 100 nodes over 4 chunks of L = 75 (25 edges of 3 tokens each,
no padding), T = 304 (the paper quotes T = 360 without giving its layout).
"""

from __future__ import annotations

import numpy as np

PAD, ARROW, QUERY = 0, 1, 2
MAX_HOPS = 64
MAX_NODES = 256
HOP0 = 3  # token of k hops is HOP0 + k - 1
NODE0 = HOP0 + MAX_HOPS  # token of node i is NODE0 + i
VOCAB_SIZE = NODE0 + MAX_NODES
EDGE_TOKENS = 3  # u > v

DEFAULTS = {"n_nodes": 100, "hops": None, "hops_min": 1, "hops_max": 16, "n_chunks": 4,
            "chunk_len": None, "graph": "function"}  # chunk_len None: the smallest that holds the edges
DIFFICULTY = "hops"


def _chunk_len(n_nodes: int, n_chunks: int, chunk_len: int | None) -> int:
  if chunk_len is not None:
    return int(chunk_len)
  return max(-(-n_nodes // n_chunks) * EDGE_TOKENS, 3)


def seq_len(n_nodes=DEFAULTS["n_nodes"], hops=None, hops_min=1, hops_max=16,
            n_chunks=DEFAULTS["n_chunks"], chunk_len=None, graph="function") -> int:
  return n_chunks * _chunk_len(n_nodes, n_chunks, chunk_len) + 4


def walk(succ: np.ndarray, start: int, hops: int) -> int:
  node = int(start)
  for _ in range(hops):
    node = int(succ[node])
  return node


def sample(rng: np.random.Generator, n_nodes=DEFAULTS["n_nodes"], hops=None, hops_min=1,
           hops_max=16, n_chunks=DEFAULTS["n_chunks"], chunk_len=None, graph="function") -> dict:
  L = _chunk_len(n_nodes, n_chunks, chunk_len)
  if not 2 <= n_nodes <= MAX_NODES or n_chunks < 1:
    raise ValueError(f"khop needs 2 <= n_nodes <= {MAX_NODES} and n_chunks >= 1")
  per_chunk = -(-n_nodes // n_chunks)
  if per_chunk * EDGE_TOKENS > L or L < 3:
    raise ValueError(f"khop chunk_len={L} cannot hold {per_chunk} edges of {EDGE_TOKENS} tokens")
  if hops is None:
    if not 1 <= hops_min <= hops_max <= MAX_HOPS:
      raise ValueError(f"khop needs 1 <= hops_min <= hops_max <= {MAX_HOPS}")
    hops = int(rng.integers(hops_min, hops_max + 1))
  if not 1 <= hops <= MAX_HOPS:
    raise ValueError(f"khop hops={hops} outside 1..{MAX_HOPS}")

  if graph == "function":
    succ = rng.integers(0, n_nodes, size=n_nodes)
  elif graph == "permutation":
    succ = rng.permutation(n_nodes)
  else:
    raise ValueError(f"khop graph={graph!r}: expected 'function' or 'permutation'")
  order = rng.permutation(n_nodes)
  edges = np.stack([order, succ[order]], axis=1).astype(np.int64)
  start = int(rng.integers(0, n_nodes))
  answer = walk(succ, start, hops)

  T = n_chunks * L + 4
  tokens = np.zeros(T, np.int32)
  loss_mask = np.zeros(T, np.int32)
  for c in range(n_chunks):
    part = edges[c * n_nodes // n_chunks:(c + 1) * n_nodes // n_chunks]
    trip = np.stack([NODE0 + part[:, 0], np.full(len(part), ARROW), NODE0 + part[:, 1]], axis=1)
    tokens[c * L:c * L + trip.size] = trip.reshape(-1)
  tokens[T - 4:] = [QUERY, NODE0 + start, HOP0 + hops - 1, NODE0 + answer]
  loss_mask[T - 1] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "edges": edges, "start": start,
          "hops": int(hops), "answer": answer, "difficulty": int(hops)}


def _word(tok: int) -> str:
  if tok == ARROW:
    return ">"
  if tok == QUERY:
    return "?"
  if HOP0 <= tok < NODE0:
    return f"h{tok - HOP0 + 1}"
  if NODE0 <= tok < VOCAB_SIZE:
    return f"n{tok - NODE0}"
  return f"<{tok}>"


def to_text(tokens) -> str:
  """Edges as 'n3>n7', hop counts as 'h5', a run of PADs as '_*n'."""
  from sleep_jax.data.tasks import words

  out: list[str] = []
  for w in words(tokens, _word, PAD):
    if w == ">" and out:
      out[-1] += ">"
    elif out and out[-1].endswith(">"):
      out[-1] += w
    else:
      out.append(w)
  return " ".join(out)
