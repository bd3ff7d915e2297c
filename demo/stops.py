"""Ctrl-C and SIGTERM: stop at the next safe point, keep everything finished, say how to go on.

The signal handler only sets a flag; nothing is raised inside model code. The run reads the flag at
safe points: at every generated token (a stopping criterion of `generate`, through treerpo's
`should_stop`), before each forward of the loss, between evaluation batches, and after each step.
Where the work under way can be done again exactly on resume (sampling, the loss before its
update, an evaluation) it is dropped there; an update, once its optimizer step begins, and a save
are finished first. A second signal aborts at once (KeyboardInterrupt), keeping the last checkpoint.
What the run prints never fails it: a closed stdout or stderr (a `| tee` ended by the same Ctrl-C)
is let go, and the work is saved all the same.
"""

import errno
import os
import shlex
import signal
import sys
from pathlib import Path

from demo import checkpoints, distributed
from treerpo import StopRequested

Dropped = StopRequested  # a stop came where the work under way can be dropped: it is done again on resume, exactly


class Stop:
    """While active, the first SIGINT or SIGTERM sets `requested` (the signal's name). `should_stop()`
    is what the samplers and the loss check at their safe points; `check()` raises Dropped there in
    the loop's own code. can_drop=False (several processes, which must stop at the same point): the
    work under way is never dropped, the run stops after the step. `commit()`: an update begins."""

    def __init__(self, can_drop: bool = True):
        self.can_drop, self.committed, self.requested = can_drop, False, None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        say(f"\n{self.requested}: stopping at the next safe point, keeping what is done; press Ctrl-C again to "
            "abort at once", sys.stderr)

    def should_stop(self) -> bool:
        return bool(self.requested) and self.can_drop and not self.committed

    def check(self):
        if self.should_stop():
            raise Dropped

    def commit(self):
        """From here the work under way must finish (an optimizer step begins); `begin` ends it."""
        self.committed = True

    def begin(self) -> "Stop":
        """New work begins that a stop may drop; returns the Stop, to be passed on to that work."""
        self.committed = False
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def say(text: str, stream=None):
    """Print `text` to stdout (or `stream`), flushed; a stream whose reader has gone is let go (replaced
    by /dev/null), so that nothing printed can fail the run or its save."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, ValueError, OSError):  # ValueError: a closed file
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


def exit_stopped(stop: Stop, what: str, saved: Path | None, argv: list[str]):
    """Say (process 0) what a stop cut short and how to go on, from `saved` (the checkpoint that
    holds the run so far) or, with none, from the start; exit with status 130."""
    if distributed.rank_and_world()[0] == 0:
        go_on = (f"checkpoint in {saved}. Resume with: {command(argv, '--resume')}" if saved else
                 f"nothing to keep yet. Start over with: {command(argv, None)}")
        say(f"stopped by {stop.requested or 'a stop signal'} {what}; {go_on}")
    raise SystemExit(130)


KEPT_ENVIRONMENT = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")  # they change the speed or the device


def command(argv: list[str], flag: str | None) -> str:
    """`python train_gsm8k.py` (under torchrun, with as many processes) with `argv` less --resume and
    --overwrite, plus `flag`, after the environment variables of KEPT_ENVIRONMENT this run started with."""
    environment = [f"{name}={shlex.quote(os.environ[name])}" for name in KEPT_ENVIRONMENT if name in os.environ]
    processes = distributed.processes()
    launcher = f"torchrun --standalone --nproc_per_node {processes}" if processes > 1 else "python"
    arguments = [arg for arg in argv if arg not in ("--resume", "--overwrite")] + ([flag] if flag else [])
    return " ".join(environment + [f"{launcher} train_gsm8k.py", shlex.join(arguments)])


def where_to_go_on(out: Path, steps: int, argv: list[str]) -> str:
    """From the last complete checkpoint: that the run is complete, or the command that resumes it;
    with none, the command that starts over (--overwrite where records remain)."""
    saved = checkpoints.checkpoints(out)
    if not saved:
        start_over = command(argv, "--overwrite" if (out / "metrics.jsonl").exists() else None)
        return f"No checkpoint was saved yet; start over with: {start_over}"
    if checkpoints.checkpoint_step(saved[-1]) >= steps and not checkpoints.checkpoint_pending(saved[-1]):
        return f"The run is complete: its last checkpoint is {saved[-1]}"
    return f"The last complete checkpoint is {saved[-1]}; resume with: {command(argv, '--resume')}"


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
