"""Task generators against brute-force solvers that re-read the problem from the tokens.

The solvers here share no code with the generators: rule110 goes through a rule table
written out by hand, khop walks an edge list parsed from the token stream, arith parses
the token stream and evaluates it by repeated substitution.
"""

import numpy as np
import pytest

from sleep_jax.data.tasks import generate, get_task, options_for

# -- brute-force solvers, from tokens only ---------------------------------------------

RULE110 = {(1, 1, 1): 0, (1, 1, 0): 1, (1, 0, 1): 1, (1, 0, 0): 0,
           (0, 1, 1): 1, (0, 1, 0): 1, (0, 0, 1): 1, (0, 0, 0): 0}


def solve_rule110(tokens, K, W, steps, chunk_len):
  L = chunk_len or W
  labels, states = [], []
  for i in range(K):
    cells = [int(t) - 1 for t in tokens[i * L:i * L + W]]  # BIT0 = 1, BIT1 = 2
    assert set(cells) <= {0, 1} and all(t == 0 for t in tokens[i * L + W:(i + 1) * L])
    states.append(cells)
    for _ in range(steps):
      cells = [RULE110[(cells[j - 1], cells[j], cells[(j + 1) % W])] for j in range(W)]
    labels.append(cells[W // 2])
  return states, labels


def solve_khop(tokens):
  mod = get_task("khop")
  toks = [int(t) for t in tokens]
  q = toks.index(mod.QUERY)
  succ, edges = {}, []
  body = [t for t in toks[:q] if t != mod.PAD]
  assert len(body) % 3 == 0
  for u, arrow, v in zip(body[0::3], body[1::3], body[2::3]):
    assert arrow == mod.ARROW
    assert u not in succ  # one successor per node
    succ[u] = v
    edges.append([u - mod.NODE0, v - mod.NODE0])
  start, hop_tok = toks[q + 1], toks[q + 2]
  node = start
  for _ in range(hop_tok - mod.HOP0 + 1):
    node = succ[node]
  return edges, start - mod.NODE0, node - mod.NODE0


def solve_arith(tokens, p):
  text = get_task("arith").to_text(tokens).split()
  assert text[0] == "?" and text[-2] == "=>"
  query = text[1]
  words = [w for w in text[2:-2] if not w.startswith("_*")]
  stmts = " ".join(words).split(";")
  assert stmts[-1].strip() == ""
  defs = {}
  for s in stmts[:-1]:
    dst, eq, *rhs = s.split()
    assert eq == "=" and dst not in defs
    defs[dst] = rhs
  env = {}
  while query not in env:  # substitute until the query is known; must make progress
    before = len(env)
    for dst, rhs in defs.items():
      if dst in env:
        continue
      if len(rhs) == 1:
        env[dst] = int(rhs[0]) % p
      elif rhs[0] in env and rhs[2] in env:
        a, op, b = env[rhs[0]], rhs[1], env[rhs[2]]
        env[dst] = eval(f"({a} {op} {b}) % {p}")
    assert len(env) > before
  return env[query]


# -- correctness against the solvers ----------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 5, 32])
def test_rule110_matches_brute_force(steps):
  mod = get_task("rule110")
  rng = np.random.default_rng(steps)
  for opts in [dict(K=4, W=24, chunk_len=None), dict(K=3, W=9, chunk_len=12)]:
    for _ in range(60):
      ex = mod.sample(rng, steps=steps, **opts)
      states, labels = solve_rule110(ex["tokens"], steps=steps, **opts)
      assert np.array_equal(np.array(states), ex["states"])
      assert labels == ex["labels"].tolist()
      assert (ex["tokens"][ex["loss_mask"] == 1] - 1).tolist() == labels
      assert ex["steps"] == ex["difficulty"] == steps
      assert ex["states"].dtype == ex["labels"].dtype == np.uint8


def test_rule110_known_rollout():
  # a single live cell grows to the left under rule 110: 0001000 -> 0011000 -> 0111000
  mod = get_task("rule110")
  s = np.array([[0, 0, 0, 1, 0, 0, 0]], np.uint8)
  assert mod.rollout(s, 1).tolist() == [[0, 0, 1, 1, 0, 0, 0]]
  assert mod.rollout(s, 2).tolist() == [[0, 1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("hops", [1, 2, 4, 8, 16, None])
def test_khop_matches_brute_force(hops):
  mod = get_task("khop")
  rng = np.random.default_rng(100 + (hops or 0))
  seen = set()
  for opts in [dict(), dict(n_nodes=10, n_chunks=3, chunk_len=14), dict(n_nodes=8, graph="permutation")]:
    for _ in range(60):
      ex = mod.sample(rng, **options_for("khop", dict(opts, hops=hops)))
      edges, start, answer = solve_khop(ex["tokens"])
      assert edges == ex["edges"].tolist() and start == ex["start"]
      assert answer == ex["answer"]
      assert ex["tokens"][ex["loss_mask"] == 1].tolist() == [mod.NODE0 + answer]
      assert ex["hops"] == ex["difficulty"] and (hops is None or ex["hops"] == hops)
      assert sorted(u for u, _ in edges) == list(range(len(edges)))  # a functional graph
      if opts.get("graph") == "permutation":
        assert sorted(v for _, v in edges) == list(range(len(edges)))
      seen.add(ex["hops"])
  if hops is None:  # the training range: k drawn from 1..16
    assert seen <= set(range(1, 17)) and len(seen) > 8


@pytest.mark.parametrize("n_ops", [0, 1, 3, 6, 8])
@pytest.mark.parametrize("shuffle", [False, True])
def test_arith_matches_brute_force(n_ops, shuffle):
  mod = get_task("arith")
  rng = np.random.default_rng(200 + n_ops)
  for opts in [dict(p=11), dict(p=7, n_chunks=2, n_distractors=0, chunk_len=60)]:
    for _ in range(40):
      ex = mod.sample(rng, **options_for("arith", dict(opts, n_ops=n_ops, shuffle=shuffle)))
      assert solve_arith(ex["tokens"], opts["p"]) == ex["answer"]
      assert ex["tokens"][ex["loss_mask"] == 1].tolist() == [mod.NUM0 + ex["answer"]]
      assert ex["difficulty"] == n_ops
      # the structured program re-evaluates to the same answer and has n_ops operations
      assert mod.evaluate(ex["program"], opts["p"])[ex["query"]] == ex["answer"]
      ops = sum(op != "=" for _, op, _, _ in ex["program"])
      assert ops >= n_ops


# -- layout, determinism, splits --------------------------------------------------------

LAYOUTS = [
    ("rule110", {}, 24, 4),
    ("rule110", dict(K=3, W=8, steps=4, chunk_len=10), 10, 3),
    ("khop", {}, 75, 4),
    ("khop", dict(n_nodes=12, n_chunks=3, chunk_len=20, hops=5), 20, 3),
    ("arith", {}, None, 4),
    ("arith", dict(n_ops=3, n_chunks=2, chunk_len=40), 40, 2),
]


@pytest.mark.parametrize("name,options,L,n_consolidation", LAYOUTS)
def test_consolidation_chunk_layout(name, options, L, n_consolidation):
  mod = get_task(name)
  opts = options_for(name, options)
  rng = np.random.default_rng(7)
  for _ in range(50):
    ex = mod.sample(rng, **opts)
    T = mod.seq_len(**opts)
    assert ex["tokens"].shape == ex["loss_mask"].shape == (T,)
    assert ex["tokens"].dtype == ex["loss_mask"].dtype == np.int32
    assert ex["tokens"].min() >= 0 and ex["tokens"].max() < mod.VOCAB_SIZE
    assert ex["loss_mask"][0] == 0 and set(ex["loss_mask"].tolist()) <= {0, 1}
    assert isinstance(ex["difficulty"], int)
    chunk = L or (T - 2) // n_consolidation  # arith default: derived chunk_len
    targets = ex["loss_mask"][1:]  # input position t predicts token t + 1
    chunks = [targets[i:i + chunk] for i in range(0, T - 1, chunk)]
    assert len(chunks) == n_consolidation + 1
    assert all(c.sum() == 0 for c in chunks[:-1])
    assert chunks[-1].sum() == ex["loss_mask"].sum() > 0
    assert isinstance(mod.to_text(ex["tokens"]), str) and mod.to_text(ex["tokens"])


def test_paper_scale_lengths():
  assert get_task("rule110").seq_len(**options_for("rule110")) == 101  # 96 state + ? + 4 labels
  assert get_task("khop").seq_len(**options_for("khop")) == 304  # 4 chunks of 75 + 4


@pytest.mark.parametrize("name", ["rule110", "khop", "arith"])
def test_generate_deterministic(name):
  a = generate(name, "train", 3, seed=11)
  b = generate(name, "train", 3, seed=11)
  c = generate(name, "train", 4, seed=11)
  assert a.keys() == b.keys()
  for k in a:
    same = np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
    assert same, k
  assert not np.array_equal(a["tokens"], c["tokens"])


SMALL = {"rule110": dict(K=2, W=6, steps=3), "khop": dict(n_nodes=5, n_chunks=2, hops=None, hops_max=4),
         "arith": dict(n_ops=2, n_distractors=1, n_chunks=2, p=5)}


@pytest.mark.parametrize("name", ["rule110", "khop", "arith"])
def test_train_eval_disjoint(name):
  train = {generate(name, "train", i, 0, SMALL[name])["tokens"].tobytes() for i in range(300)}
  evals = {generate(name, "eval", i, 0, SMALL[name])["tokens"].tobytes() for i in range(300)}
  assert train.isdisjoint(evals)
  assert len(train) > 100 and len(evals) > 100


def test_bad_options_raise():
  with pytest.raises(ValueError):
    get_task("rule110").sample(np.random.default_rng(0), W=24, chunk_len=20)
  with pytest.raises(ValueError):
    get_task("khop").sample(np.random.default_rng(0), n_nodes=100, chunk_len=60)
  with pytest.raises(ValueError):
    get_task("arith").sample(np.random.default_rng(0), n_ops=20, n_vars=26)
