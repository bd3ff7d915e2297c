"""Ctrl-C and SIGTERM. The first lets the step under way (and its evaluation, if due) finish; the run then
saves and prints the command that goes on. A second stops at once (KeyboardInterrupt), keeping the last
checkpoint. The handler only sets a flag, which the loop reads after each step."""

import os
import shlex
import signal
import sys

from demo import distributed


class Stop:
    """While active, `requested` holds the name of the first SIGINT or SIGTERM; a second one interrupts."""

    def __enter__(self):
        self.requested = None
        self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        say(f"\n{self.requested}: stopping after this step, once it is saved; again to stop at once", sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def say(text: str, stream=None):
    """Print `text`, flushed; a stream whose reader has gone (`| tee`, ended by the same Ctrl-C) is let go."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # else Python fails at exit, flushing it


def command(argv: list[str], flag: str | None) -> str:
    """The command that goes on: this one without --resume and --overwrite, plus `flag`, under the
    OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES it ran with, and as many torchrun processes."""
    environment = [f"{name}={shlex.quote(os.environ[name])}" for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                   if name in os.environ]
    launcher = f"torchrun --standalone --nproc_per_node {distributed.processes()}" if distributed.processes() > 1 \
        else "python"
    arguments = [arg for arg in argv if arg not in ("--resume", "--overwrite")] + ([flag] if flag else [])
    return " ".join(environment + [f"{launcher} train_gsm8k.py", shlex.join(arguments)])
