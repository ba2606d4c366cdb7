"""GSM-Infinite-style arithmetic: the question first, then a program mod p, answer at the end.

Layout (L = chunk_len; C = n_chunks consolidation chunks):

  [? q  stmt stmt ... PAD] [stmt stmt ... PAD] ... [stmt ... PAD]  =>  answer

A statement is `x = c ;` (c a number) or `x = a op b ;` (a, b variables, op in + - *), all
mod p. Every variable is assigned exactly once, so the value of each variable does not
depend on the order statements are written in. The question `? q` comes first, as in
the paper, so that sleep can work on the one variable that is asked for; it is not
repeated after the last eviction, only the answer prompt `=>` is, so the recurrent state
must carry the question too. The answer is one number token: no chain of thought.

Difficulty is `n_ops`: the asked variable is the end of a chain of n_ops operations, each
using the previous result and either a fresh constant or an earlier chain variable, so all
n_ops operations are needed. `n_distractors` extra statements define variables the answer
does not depend on. Statements are written in a random order that respects definitions
(a random topological order), or in any order with shuffle=True (a harder variant: a
statement may use a variable defined later). Variable names are drawn at random from
n_vars names, so a name carries no position information. Statements are split as evenly
as possible over the chunks, whole statements only. T = C*L + 2.
"""

from __future__ import annotations

import numpy as np

PAD, EQ, PLUS, MINUS, TIMES, SEMI, QUERY, ANSWER = range(8)
MAX_P = 32
MAX_VARS = 64
NUM0 = 8  # token of number c is NUM0 + c
VAR0 = NUM0 + MAX_P  # token of variable i is VAR0 + i
VOCAB_SIZE = VAR0 + MAX_VARS
OPS = {"+": PLUS, "-": MINUS, "*": TIMES}
OP_TOKENS = {v: k for k, v in OPS.items()}
STMT_TOKENS = 6  # the longest statement, x = a op b ;

DEFAULTS = {"n_ops": 6, "p": 11, "n_vars": 26, "n_distractors": 4, "n_chunks": 4,
            "chunk_len": None, "shuffle": False}  # chunk_len None: the smallest that always fits
DIFFICULTY = "n_ops"


def _max_statements(n_ops: int, n_distractors: int) -> int:
  return 2 * n_ops + 1 + n_distractors  # each op may bring a fresh constant


def _chunk_len(n_ops, n_distractors, n_chunks, chunk_len) -> int:
  if chunk_len is not None:
    return int(chunk_len)
  return 2 + -(-_max_statements(n_ops, n_distractors) // n_chunks) * STMT_TOKENS


def seq_len(n_ops=DEFAULTS["n_ops"], p=DEFAULTS["p"], n_vars=DEFAULTS["n_vars"],
            n_distractors=DEFAULTS["n_distractors"], n_chunks=DEFAULTS["n_chunks"],
            chunk_len=None, shuffle=False) -> int:
  return n_chunks * _chunk_len(n_ops, n_distractors, n_chunks, chunk_len) + 2


def apply(op: str, a: int, b: int, p: int) -> int:
  return {"+": a + b, "-": a - b, "*": a * b}[op] % p


def evaluate(program, p: int) -> dict[int, int]:
  """Values of all variables; repeated sweeps, since statements may be written out of order."""
  env: dict[int, int] = {}
  while len(env) < len(program):
    for dst, op, a, b in program:
      if dst in env:
        continue
      if op == "=":
        env[dst] = a % p
      elif a in env and b in env:
        env[dst] = apply(op, env[a], env[b], p)
  return env


def _build(rng, n_ops, p, n_vars, n_distractors):
  """Statements (dst, op, a, b) in generation order (definitions first), and the asked var."""
  names = iter(rng.permutation(n_vars).tolist())
  program = []

  def const() -> int:
    x = next(names)
    program.append((x, "=", int(rng.integers(p)), None))
    return x

  chain = [const()]
  for _ in range(n_ops):
    # an earlier chain variable, never the current one: x - x would be 0 whatever x is
    reuse = len(chain) > 1 and rng.random() < 0.5
    other = chain[rng.integers(len(chain) - 1)] if reuse else const()
    a, b = (chain[-1], other) if rng.random() < 0.5 else (other, chain[-1])
    chain.append(next(names))
    program.append((chain[-1], str(rng.choice(list(OPS))), a, b))
  defined = [s[0] for s in program]
  for _ in range(n_distractors):
    if len(defined) < 2 or rng.random() < 0.5:  # an op needs two different inputs
      defined.append(const())
    else:
      a, b = rng.choice(defined, size=2, replace=False)
      defined.append(next(names))
      program.append((defined[-1], str(rng.choice(list(OPS))), int(a), int(b)))
  return program, chain[-1]


def _order(rng, program, shuffle: bool):
  if shuffle:
    return [program[i] for i in rng.permutation(len(program))]
  done, left, out = set(), list(program), []
  while left:  # a random topological order: any statement whose inputs are defined
    ready = [s for s in left if s[1] == "=" or (s[2] in done and s[3] in done)]
    s = ready[rng.integers(len(ready))]
    left.remove(s)
    done.add(s[0])
    out.append(s)
  return out


def _stmt_tokens(s) -> list[int]:
  dst, op, a, b = s
  if op == "=":
    return [VAR0 + dst, EQ, NUM0 + a, SEMI]
  return [VAR0 + dst, EQ, VAR0 + a, OPS[op], VAR0 + b, SEMI]


def sample(rng: np.random.Generator, n_ops=DEFAULTS["n_ops"], p=DEFAULTS["p"],
           n_vars=DEFAULTS["n_vars"], n_distractors=DEFAULTS["n_distractors"],
           n_chunks=DEFAULTS["n_chunks"], chunk_len=None, shuffle=False) -> dict:
  L = _chunk_len(n_ops, n_distractors, n_chunks, chunk_len)
  S_max = _max_statements(n_ops, n_distractors)
  if n_ops < 0 or n_distractors < 0 or n_chunks < 1 or not 2 <= p <= MAX_P:
    raise ValueError(f"arith needs n_ops, n_distractors >= 0, n_chunks >= 1, 2 <= p <= {MAX_P}")
  if not S_max <= n_vars <= MAX_VARS:
    raise ValueError(f"arith n_vars={n_vars} must be in {S_max}..{MAX_VARS} (one name per statement)")
  if L < 2 + -(-S_max // n_chunks) * STMT_TOKENS:
    raise ValueError(f"arith chunk_len={L} cannot always hold the question and "
                     f"{-(-S_max // n_chunks)} statements of up to {STMT_TOKENS} tokens")
  program, query = _build(rng, n_ops, p, n_vars, n_distractors)
  program = _order(rng, program, shuffle)
  answer = evaluate(program, p)[query]

  T = n_chunks * L + 2
  tokens = np.zeros(T, np.int32)
  loss_mask = np.zeros(T, np.int32)
  tokens[:2] = [QUERY, VAR0 + query]
  S = len(program)
  for c in range(n_chunks):
    body = [t for s in program[c * S // n_chunks:(c + 1) * S // n_chunks] for t in _stmt_tokens(s)]
    at = c * L + (2 if c == 0 else 0)
    tokens[at:at + len(body)] = body
  tokens[T - 2:] = [ANSWER, NUM0 + answer]
  loss_mask[T - 1] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "answer": int(answer), "query": int(query),
          "p": int(p), "program": program, "difficulty": int(n_ops)}


def _word(tok: int) -> str:
  fixed = {EQ: "=", SEMI: ";", QUERY: "?", ANSWER: "=>", **OP_TOKENS}
  if tok in fixed:
    return fixed[tok]
  if NUM0 <= tok < VAR0:
    return str(tok - NUM0)
  if VAR0 <= tok < VOCAB_SIZE:
    return f"v{tok - VAR0}"
  return f"<{tok}>"


def to_text(tokens) -> str:
  """Numbers as digits, variables as v12, ops as + - *, a run of PADs as '_*n'."""
  from sleep_jax.data.tasks import words

  return " ".join(words(tokens, _word, PAD))
