"""Exit codes of every `sleep-jax` command (kept free of imports: the signal handlers that
use them are installed before JAX is imported).

Launchers requeue or retry on PREEMPTED only; every other code means "look at the log".
"""

USAGE = 2  # a bad config, data, run dir or checkpoint: the one-line message says what to fix
NONFINITE = 3  # the loss went NaN/Inf; the last good checkpoint is kept
SAVE_FAILED = 74  # EX_IOERR: a checkpoint could not be written (read-only, disk full); the last good one is kept
PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM; saved if there was anything to save; "try again"
INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C; saved at the next step boundary (a second one: at once)
