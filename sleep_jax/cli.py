"""`sleep-jax` command line: train, eval (more sub-commands register themselves here).

Errors a user can fix (config, data, run dir in use, checkpoint) print one line and exit 2;
a non-finite loss exits 3; a failed checkpoint save 74; preemption (SIGTERM, at any
moment) 75, after saving if there is anything to save; Ctrl-C 130 after saving at the next
step boundary (exit_codes.py, signals.py). The process always exits: if background threads
(orbax's, after a failed save) still hold it EXIT_TIMEOUT_S after the command is done, it
leaves without them.
"""

from __future__ import annotations

import os
import sys

from sleep_jax import exit_codes, signals

EXIT_USAGE = exit_codes.USAGE
EXIT_TIMEOUT_S = float(os.environ.get("SLEEP_JAX_EXIT_TIMEOUT", "20"))

import argparse  # noqa: E402 - after the signal module: nothing slow may come before main()
import json  # noqa: E402
import logging  # noqa: E402


class _OneLineFromLibraries(logging.Filter):
  """orbax (through absl logging) logs every failure of its background threads with a full
  traceback (several, for one failed save); the command reports the failure itself in one
  line, so theirs are cut to their first line."""

  def filter(self, record: logging.LogRecord) -> bool:
    lib = record.name == "absl" or record.name.startswith("orbax") or "/orbax/" in (record.pathname or "")
    if record.exc_info and lib:
      record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], None
      record.exc_info = record.exc_text = None
    return True


def _setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_OneLineFromLibraries())
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_eval(result: dict) -> None:
  rows = [(k.split("_d")[-1], v) for k, v in result.items() if k.startswith("eval/accuracy_d")]
  print(f"eval: loss {result['eval/loss']:.4f}  accuracy {result['eval/accuracy']:.4f}  "
        f"({result['eval/examples']} examples)")
  if len(rows) > 1:
    print("difficulty  accuracy")
    for d, v in rows:
      print(f"{d:>10}  {v:.4f}")


def cmd_train(args) -> int:
  from sleep_jax.config import load_config
  from sleep_jax.loop import train

  cfg = load_config(args.config, args.overrides)
  result = train(cfg)
  _print_eval(result)
  return 0


def cmd_eval(args) -> int:
  from sleep_jax.config import ConfigError, load_config
  from sleep_jax.evaluate import evaluate_run_dir

  if args.batches is not None and args.batches < 1:
    raise ConfigError(f"bad value for --batches: {args.batches} (must be >= 1)")
  path = os.path.join(args.run_dir, "config.yaml")
  if not os.path.exists(path):
    raise ConfigError(f"{args.run_dir} is not a run dir (no config.yaml)")
  cfg = load_config(path, [f"run_dir={args.run_dir}", *args.overrides])
  if args.long_context:
    from sleep_jax.longctx import evaluate_long_context, format_long_context

    if cfg.data.source != "corpus":
      raise ConfigError(f"--long-context needs a text corpus run (data.source=corpus), not data.source={cfg.data.source}")
    result = evaluate_long_context(cfg, num_batches=args.batches, passkeys=args.passkeys)
    print(format_long_context(result))
  else:
    result = evaluate_run_dir(cfg, num_batches=args.batches)
    _print_eval(result)
  print(json.dumps(result))
  return 0


class _OneLineParser(argparse.ArgumentParser):
  """A bad option (`--nodes 1.5`, a missing argument) is one line, exit 2, like every other
  bad input; the usage is one `--help` away. Sub-command parsers inherit the class."""

  def error(self, message: str):
    self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  p = _OneLineParser(prog="sleep-jax", description="Language models that sleep, in JAX.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a model from a YAML config",
                     description="Train (or resume, if RUN_DIR holds checkpoints) and print the final eval.")
  t.add_argument("config", help="YAML config, e.g. experiments/tiny.yaml")
  t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10 sleep.passes=2")
  t.set_defaults(func=cmd_train)
  e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run dir",
                     description="Exact-match accuracy of the answer tokens on the held-out split, per difficulty; "
                                 "with --long-context, the long-context text evaluation.")
  e.add_argument("run_dir")
  e.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data.eval_task_options.steps=8)")
  e.add_argument("--batches", type=int, default=None, help="limit the number of eval batches (default: all)")
  e.add_argument("--long-context", action="store_true",
                 help="text runs: perplexity by offset since eviction and by distance to the document start, "
                      "and passkey retrieval across evictions (writes RUN_DIR/long_context.json)")
  e.add_argument("--passkeys", type=int, default=32, help="passkey examples per gap (with --long-context)")
  e.set_defaults(func=cmd_eval)
  _add_tokenizer_parser(sub)
  for register in _extra_commands():
    register(sub)
  return p


def cmd_tokenizer_train(args) -> int:
  from sleep_jax.tokenizer import TokenizerError, iter_corpus, train_bpe

  try:
    tok = train_bpe(args.corpus, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    sample = next(iter_corpus(args.corpus))[:4000]
  except TokenizerError as e:  # raised here, not in main(), so main's error list stays its own
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  ids = tok.encode(sample)
  ok = tok.decode(ids) == sample
  print(f"vocabulary: {tok.vocab_size} tokens (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}) -> {args.out}")
  print(f"round trip: {'ok' if ok else 'FAILED'} on {len(sample)} chars of the corpus -> {len(ids)} tokens "
        f"({len(sample) / max(len(ids), 1):.2f} chars/token)")
  return 0 if ok else 1


def _add_tokenizer_parser(sub) -> None:
  t = sub.add_parser("tokenizer", help="tokenizer tools (train a byte-level BPE)",
                     description="Tokenizer tools.")
  verbs = t.add_subparsers(dest="verb", required=True)
  tr = verbs.add_parser("train", help="train a byte-level BPE on text files",
                        description="Train a byte-level BPE (<|bos|>, <|eos|>, <|pad|>) on plain text, .jsonl "
                                    "(a \"text\" field) or directories (*.txt/*.md/*.py/*.jsonl, recursively) "
                                    "and write OUT/tokenizer.json + tokenizer_config.json (loads with "
                                    "transformers.AutoTokenizer).")
  tr.add_argument("corpus", nargs="+", metavar="CORPUS", help="text/.jsonl files or directories")
  tr.add_argument("out", metavar="OUT", help="output directory")
  tr.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. specials (default 8192)")
  tr.add_argument("--min-frequency", type=int, default=2, help="min pair count for a merge (default 2)")
  tr.set_defaults(func=cmd_tokenizer_train)


def _extra_commands():
  """Sub-commands contributed by other modules (sweep, seed, dream, launch) once present."""
  import importlib

  out = []
  for mod in ("sleep_jax.sweep", "sleep_jax.seeding.cli", "sleep_jax.dreaming.cli", "sleep_jax.launch.cli",
              "sleep_jax.hf.cli"):
    try:
      out.append(importlib.import_module(mod).register)
    except ModuleNotFoundError as e:
      if e.name is None or not mod.startswith(e.name):
        raise
  return out


def _run(argv: list[str] | None) -> int:
  args = build_parser().parse_args(argv)
  _setup_logging()
  from sleep_jax.checkpoint import CheckpointError, SaveFailed
  from sleep_jax.config import ConfigError
  from sleep_jax.data import DataError
  from sleep_jax.hf.safetensors_io import HFError
  from sleep_jax.engine import NonFiniteLoss
  from sleep_jax.tokenizer import TokenizerError

  try:
    return args.func(args)
  except (ConfigError, DataError, CheckpointError, HFError, TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except (NonFiniteLoss, SaveFailed) as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def _exit_watchdog(code: int, timeout_s: float) -> None:
  """Leave with `code` even if non-daemon threads would keep the interpreter from exiting."""
  import threading
  import time

  def watch():
    time.sleep(timeout_s)
    busy = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    try:
      print(f"exit: background threads still running after {timeout_s:.0f} s ({', '.join(busy[:5])}); "
            f"exiting with code {code} without them", file=sys.stderr, flush=True)
    finally:
      os._exit(code)

  threading.Thread(target=watch, name="exit_watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
  """As the program (argv None): signals first, and the process always exits. Called with
  argv (tests, other Python code): the handlers are put back and nothing is forced."""
  signals.install(hard_exit=argv is None)
  try:
    code = _run(argv)
  except SystemExit as e:  # Preempted / Interrupted / argparse: keep their codes
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if argv is not None:
      raise
  except KeyboardInterrupt:  # a SIGINT before the handler (or in code that swallowed it)
    print(f"interrupted (exit {exit_codes.INTERRUPTED})", file=sys.stderr)
    code = exit_codes.INTERRUPTED
  finally:
    if argv is not None:
      signals.uninstall()
  if argv is None:
    # After a failed save orbax's threads are known not to finish: do not wait long for them.
    _exit_watchdog(code, min(EXIT_TIMEOUT_S, 3.0) if code == exit_codes.SAVE_FAILED else EXIT_TIMEOUT_S)
  return code


if __name__ == "__main__":
  sys.exit(main())
