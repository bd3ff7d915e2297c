"""How long Ctrl-C takes to stop the demo, phase by phase: the seconds from the signal to the moment
the work under way is dropped (the save, or the exit where there is nothing to save, begins).

    python -m probes.stop_latency out/qwen05 --data GSM8K_FOLDER --dtype bf16

For each phase (the evaluation before training, sampling, the loss) a fresh one-step run of the demo
(2 questions, N=4, D=2, L=192, no KL reference; for the loss, leaves rewarded alternately so that it
has rows to forward) gets SIGINT --delay seconds into that phase, from
a timer thread, as a terminal's Ctrl-C would come. Python runs the handler (which only sets a flag)
when the main thread is back in the interpreter, and the run checks the flag at its safe points: at
every generated token, before each of the loss's forwards, between evaluation batches. The last
line is one JSON object: each phase's latency and the save's seconds.
"""

import argparse
import json
import os
import signal
import tempfile
import threading
import time

import train_gsm8k
from demo import checkpoints, evaluation, stops

PHASES = {"evaluation": (evaluation, "evaluate"), "sampling": (train_gsm8k, "sample_and_score"),
          "loss": (train_gsm8k, "backward_loss")}


def one_stop(phase: str, flags: list[str], delay: float) -> dict:
    """A run signalled `delay` s into `phase`: {latency_s, save_s} (save_s: None where nothing is saved)."""
    times = {}
    module, name = PHASES[phase]
    original_phase, original_save, original_exit = getattr(module, name), checkpoints.save_step, stops.exit_stopped

    def phase_wrapper(*args, **kwargs):
        if "signal" not in times:
            times["signal"] = None
            threading.Timer(delay, lambda: (times.__setitem__("signal", time.perf_counter()),
                                            os.kill(os.getpid(), signal.SIGINT))).start()
        return original_phase(*args, **kwargs)

    def save(*args, **kwargs):
        times.setdefault("dropped", time.perf_counter())
        saved = original_save(*args, **kwargs)
        times["saved"] = time.perf_counter()
        return saved

    def exit_stopped(*args, **kwargs):
        times.setdefault("dropped", time.perf_counter())
        return original_exit(*args, **kwargs)
    setattr(module, name, phase_wrapper)
    checkpoints.save_step, stops.exit_stopped = save, exit_stopped
    original_reward, flips = train_gsm8k.gsm8k_reward, iter(range(10**6))
    if phase == "loss":  # leaves rewarded alternately, so that groups differ and the loss has rows to forward
        train_gsm8k.gsm8k_reward = lambda text, answer, strict=False: float(next(flips) % 2)
    try:
        with tempfile.TemporaryDirectory() as out:
            try:
                train_gsm8k.main(flags + ["--out", out])
            except SystemExit as exit:
                assert exit.code == 130, exit.code
    finally:
        setattr(module, name, original_phase)
        checkpoints.save_step, stops.exit_stopped = original_save, original_exit
        train_gsm8k.gsm8k_reward = original_reward
    return {"latency_s": round(times["dropped"] - times["signal"], 2),
            "save_s": round(times["saved"] - times["dropped"], 1) if "saved" in times else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default="smoke")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--delay", type=float, default=5.0, help="seconds into the phase (default: %(default)s)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    args = parser.parse_args(argv)
    flags = ["--model", args.model, "--data", args.data, "--device", "cpu", "--dtype", args.dtype, "--kl-coef", "0",
             "--prompts-per-step", "2", "--sample-batch-size", "2", "--steps", "1", "--eval-size", "2",
             "--eval-batch-size", "2"]
    result = {"model": args.model, "dtype": args.dtype, "delay_s": args.delay}
    for phase in args.phases:
        result[phase] = one_stop(phase, flags, args.delay)
        print(f"{phase:10} {result[phase]}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
