"""A training run's folder that never loses work and never resumes wrong (used by train_gsm8k.py).

    <out>/run.lock                   locked while a run uses the folder: one run per folder
    <out>/run.json                   the run's config
    <out>/metrics.jsonl              one strict-JSON record per step, as many as the checkpoint says
    <out>/checkpoint-000008/         the newest complete checkpoint: weights, optimizer, RNG, step,
        manifest.json                written last: every file's size and SHA-256
    <out>/metrics.discarded.jsonl    records a resume moved aside (logged after the checkpoint)
    <out>/trees.jsonl                with --save-trees: every step's trees, trimmed the same way

A checkpoint is written into a temporary folder, flushed to disk, and renamed into place in one
step; the previous one is deleted only after that, so a crash at any instant leaves a complete
checkpoint behind. `newest_checkpoint` checks every file against the manifest before anything
loads it, and says in one line what is wrong and how to go on.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import random
import shlex
import signal
import sys
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from demo import distributed
from demo.models import trainable
from treerpo import nodes

MANIFEST = "manifest.json"
PREFIX = "checkpoint-"


# ----------------------------------------------------------------------------------------------
# One run per folder


@contextlib.contextmanager
def opened(out: Path, overwrite: bool, resume: bool, owner: bool = True):
    """Hold <out> for a run (created if need be, locked); clear it (--overwrite) or give the newest
    checkpoint (--resume: checked file by file before anything loads), else None. Only the owner
    (process 0 of several) touches the folder; the others get None."""
    if not owner:
        yield None
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = take_lock(out)  # before anything in the folder is touched
    forgotten = False
    try:
        if overwrite:
            clear_run(out)
        yield newest_checkpoint(out) if resume else None
    except BaseException:  # a start that failed, or was stopped, before anything worth resuming
        forgotten = not resume and forget_unstarted_run(out)
        raise
    finally:
        lock.release()
        if forgotten:  # the folder as it was: the same command, or a corrected one, runs in it as it is
            (out / "run.lock").unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()


def forget_unstarted_run(out: Path) -> bool:
    """Clear what a new run wrote if it ended before it had anything to resume from: no checkpoint,
    and no record of a training step (a step-0 evaluation alone is redone by the next start).
    Returns whether it cleared."""
    if checkpoints(out) or any(json.loads(line).get("step", 0) > 0 for line in readable_lines(out / "metrics.jsonl")):
        return False
    clear_run(out)
    return True


def readable_lines(path: Path) -> list[str]:
    """The complete JSON lines at the start of a JSON Lines file (none if it is missing)."""
    return json_lines(path.read_text().split("\n")[:-1] if path.exists() else [])


def json_lines(lines: list) -> list:
    """The lines (str or bytes) up to the first that is not JSON: a cut-off line ends them."""
    complete = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            break
        complete.append(line)
    return complete


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint folders in `out`, oldest first (a temporary one is hidden: .checkpoint-)."""
    return sorted(folder for folder in out.glob(f"{PREFIX}*") if folder.is_dir())


def take_lock(out: Path) -> FileLock:
    """Hold <out>/run.lock for this run; refuse in one line if another run holds it. The operating
    system releases the lock when its process ends, however it ends, so a killed run leaves no stale
    lock behind (filelock, which transformers already needs)."""
    lock = FileLock(out / "run.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SystemExit(f"--out {out} is in use by another run: wait for it to end, or pass another --out")
    return lock


# ----------------------------------------------------------------------------------------------
# Atomic, complete checkpoints


def save_checkpoint(out: Path, step: int, write_parts: list) -> Path:
    """Write checkpoint-<step> into <out> atomically; returns its folder.

    write_parts: functions, each called with the temporary folder to write its files there (the
    weights, the optimizer and RNG state, the run's state). Then every file is flushed to disk,
    the manifest is written last, and the folder is renamed into place; older checkpoints and
    leftovers of interrupted saves are deleted after that.
    """
    final = out / f"{PREFIX}{step:06d}"
    temporary = out / f".{PREFIX}{step:06d}.{os.getpid()}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for write in write_parts:
        write(temporary)
    files = sorted(path for path in temporary.rglob("*") if path.is_file())
    for path in files:
        _fsync(path)
    manifest = {"step": step, "files": {str(path.relative_to(temporary)): {"bytes": path.stat().st_size,
                                                                          "sha256": _sha256(path)} for path in files}}
    _write_synced(temporary / MANIFEST, json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step from an earlier, resumed attempt
    os.replace(temporary, final)
    _fsync(out)
    for old in out.iterdir():  # only now: until the rename, the previous checkpoint was the one to resume
        if old != final and (old.name.startswith(PREFIX) or old.name.startswith(f".{PREFIX}")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def newest_checkpoint(out: Path, hashes: bool = True) -> Path | None:
    """The newest complete checkpoint folder in `out`, checked file by file against its manifest
    (SystemExit naming the damaged file and the way out); None when there is none. Folders of
    saves that were interrupted before their rename are not checkpoints and are ignored.
    hashes=False checks only that every file is there with its size (fast)."""
    folders = checkpoints(out)
    if not folders:
        return None
    folder = folders[-1]
    problem = _damage(folder, hashes)
    if problem:
        older = f" Delete {folder} to resume from {folders[-2].name}," if len(folders) > 1 else ""
        raise SystemExit(f"--resume: {folder} is damaged: {problem}.{older} Pass --overwrite to start over.")
    return folder


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / MANIFEST).read_text())["step"]


def checkpoint_processes(folder: Path) -> int:
    """How many processes wrote a checkpoint (1 before data-parallel runs were recorded)."""
    return _run_state(folder).get("processes", 1)


def checkpoint_pending(folder: Path) -> bool:
    """Whether a stop cut the evaluation of the checkpoint's step short: resuming evaluates it."""
    return _run_state(folder).get("pending") is not None


def _run_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "run_state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _damage(folder: Path, hashes: bool) -> str | None:
    """What is wrong with a checkpoint folder, or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, step = manifest["files"], int(manifest["step"])
    except FileNotFoundError:
        return f"it has no {MANIFEST} (it was not written by this script, or was cut short)"
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} cannot be read ({type(error).__name__})"
    if folder.name != f"{PREFIX}{step:06d}":
        return f"{MANIFEST} says step {step}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, the manifest says {expected['bytes']:,}"
        if hashes and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, text: str):
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: strict JSON, and on resume exactly the records of the checkpoint


def json_record(record: dict) -> str:
    """One line of strict JSON: numpy and torch scalars as plain numbers, NaN and infinities as null."""
    def plain(value):
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy or torch scalar
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    return json.dumps({key: plain(value) for key, value in record.items()}, allow_nan=False)


def append_record(metrics_file, record: dict, records: int) -> int:
    """Append `record` to metrics.jsonl, flushed (a crash or Ctrl-C keeps every finished step); returns
    how many records the file holds now."""
    metrics_file.write(json_record(record) + "\n")
    metrics_file.flush()
    return records + 1


def show_and_keep_trees(out: Path, roots: list, problems: list[dict], tokenizer, step: int, show_every: int,
                        save_trees: bool):
    """--show-tree-every: print the first tree and keep it in <out>/trees/step_K.txt. --save-trees:
    every tree as JSON in <out>/trees.jsonl."""
    if show_every and step % show_every == 0:
        from pictures.tree_text import format_tree
        text = f"step {step}, first question of the batch:\n{format_tree(roots[0], tokenizer, width=48)}\n"
        tqdm.write(text)
        (out / "trees").mkdir(exist_ok=True)
        (out / "trees" / f"step_{step}.txt").write_text(text)
    if save_trees:
        append_trees(out / "trees.jsonl", step, roots, problems)


def append_trees(path: Path, step: int, roots: list, problems: list[dict]):
    """A line of <out>/trees.jsonl (--save-trees): the step's trees, each with its problem and its nodes
    depth-first: the index of the parent (-1: the prompt), token ids, reward, value, advantage."""
    trees = []
    for root, problem in zip(roots, problems):
        index = {node: number for number, node in enumerate(nodes(root))}
        trees.append({"question": problem["question"], "answer": problem["answer"], "nodes": [
            {"parent": index.get(node.parent, -1), "tokens": node.tokens, "finished": node.finished,
             "reward": node.reward, "value": node.value, "advantage": node.advantage} for node in index]})
    with open(path, "a") as file:
        file.write(json.dumps({"step": step, "trees": trees}) + "\n")


def trim_records(path: Path, records: int) -> int:
    """Keep the first `records` lines of a JSON Lines file (<out>/metrics.jsonl: those the checkpoint
    saw); move any later line, and a partial last line, to <name>.discarded.jsonl beside it. Returns
    how many are kept."""
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    kept = json_lines(lines[:-1][:records])  # lines[-1] follows the last newline: partial, or b""
    moved = [line for line in lines[len(kept):] if line.strip()]
    if moved:
        with open(path.with_suffix(".discarded.jsonl"), "ab") as file:
            file.write(b"".join(line + b"\n" for line in moved))
    _write_synced(path, b"".join(line + b"\n" for line in kept).decode())
    return len(kept)


# ----------------------------------------------------------------------------------------------
# A run gone wrong says so in one line


def check_health(history: list[dict], patience: int = 3) -> str | None:
    """Why the run must stop after the last step record, or None: `patience` steps in a row that were
    not applied (a non-finite loss or gradient). The first time `patience` steps in a row trained
    nothing, one warning line says what that means."""
    if len(history) >= patience and all(record["skipped"] for record in history[-patience:]):
        return (f"steps {history[-patience]['step']}-{history[-1]['step']} had a non-finite loss or gradient norm, so "
                "none was applied. Likely causes: a learning rate too high (--lr), a temperature too low, or a reward "
                "that is not finite.")
    idle = [not record["skipped"] and (record["tokens"] == 0 or record["grad_norm"] == 0) for record in history]
    idle_runs = [all(idle[end - patience:end]) for end in range(patience, len(idle) + 1)]
    if idle_runs and idle_runs[-1] and idle_runs.count(True) == 1:  # the first time only
        tqdm.write(f"warning: steps {history[-patience]['step']}-{history[-1]['step']} trained nothing (no counted "
                   f"token or a zero gradient): {why_idle(history, patience)}", file=sys.stderr)  # below the bar
    return None


def why_idle(history: list[dict], patience: int) -> str:
    """What the last `patience` records, which trained nothing, say about why: read off their rewards."""
    recent, earlier = history[-patience:], history[:-patience]
    if all(record["reward"] == 0 for record in recent):
        if any(record["reward"] > 0 for record in earlier):
            return (f"no answer was rewarded, and some were before step {recent[0]['step']}: the model may have "
                    "collapsed (try a lower --lr)")
        return ("no answer was rewarded: the questions are out of the model's reach, or its answers miss the "
                "reward's format (--reward strict pays only a \\boxed{} or #### answer)")
    if all(record["reward"] == 1 for record in recent):
        return "every answer was right: the task is too easy for the model"
    return ("every sibling group agreed (all right or all wrong), so none was kept: wider groups (--branch, --width) "
            "or a higher --temperature give them more to disagree on")


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop soon, keep everything finished, say how to go on


class Dropped(Exception):
    """A stop came while the work under way could be dropped: it is done again on resume, exactly."""


class GracefulStop:
    """While active, the first SIGINT or SIGTERM sets `requested`, and inside `droppable()` also
    raises Dropped at once: sampling, the loss before its update, an evaluation, whose work a
    resumed run does again from the same state. Elsewhere (an update under way, a save) the loop
    stops at its next safe point. A second signal raises KeyboardInterrupt at once.
    can_drop=False (several processes, which must stop at the same point): never Dropped."""

    def __init__(self, can_drop: bool = True):
        self.can_drop, self.dropping, self.requested = can_drop, False, None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        when = "now" if self.dropping else "after the work under way (an update, a save)"
        print(f"\n{self.requested}: stopping {when}, keeping what is done; press Ctrl-C again to abort at once",
              flush=True)
        if self.dropping:
            self.dropping = False
            raise Dropped

    @contextlib.contextmanager
    def droppable(self):
        """Inside, a stop drops the work under way (Dropped), also one that came just before."""
        if self.requested and self.can_drop:
            raise Dropped
        self.dropping = self.can_drop
        try:
            yield
        finally:
            self.dropping = False

    def commit(self):
        """From here the work under way must finish (an update begins): a stop waits for its end."""
        self.dropping = False

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# ----------------------------------------------------------------------------------------------
# The demo's checkpoints: what a resumed run needs to go on exactly as if never stopped


def rng_state() -> dict:
    """This process's random number generators: torch's, Python's, CUDA's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


@dataclasses.dataclass
class Begin:
    """Where a run starts: after `step` (0: nothing done yet) with the first `records` lines of
    metrics.jsonl kept; `pending`: the record of that step when a stop cut its evaluation short (the
    resumed run evaluates it first); `checkpoint`: the folder it resumes from."""
    step: int = 0
    records: int = 0
    pending: dict | None = None
    checkpoint: Path | None = None


def save_run(out: Path, step: int, model, tokenizer, optimizer, rng: list[dict], run_state: dict) -> Path:
    """<out>/checkpoint-<step>: the weights (the adapters only, with LoRA), the tokenizer, the
    optimizer, every process's RNG states (`rng`, by rank), and run_state.json (the step, how many
    metrics records the run had logged, the processes, the config, and a `pending` record whose
    evaluation is still to come). Weights that are not finite are never saved."""
    if not all(torch.isfinite(parameter).all() for parameter in trainable(model)):
        raise SystemExit(f"step {step}: the weights are not finite, so no checkpoint was saved (the last one remains)")
    return save_checkpoint(out, step, [
        model.save_pretrained, tokenizer.save_pretrained,
        lambda folder: torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, folder / "trainer_state.pt"),
        lambda folder: (folder / "run_state.json").write_text(json.dumps(run_state))])


def save_step(out: Path, step: int, *, model, tokenizer, optimizer, rng: dict, records: int, cfg,
              pending: dict | None = None) -> Path | None:
    """The run's checkpoint-<step>, written by process 0 with every process's RNG state (`rng`: this
    one's); returns its folder (None in the other processes). records: the metrics.jsonl lines it
    covers; pending: the step's record when its evaluation is still to come."""
    rank, world = distributed.rank_and_world()
    states = distributed.gather([rng])  # by rank
    state = {"step": step, "metrics_records": records, "processes": world, "config": dataclasses.asdict(cfg),
             "pending": pending}
    saved = save_run(out, step, model, tokenizer, optimizer, states, state) if rank == 0 else None
    distributed.barrier()  # no process leaves before the checkpoint is whole
    return saved


def stopped(stop: GracefulStop, what: str, saved: Path | None, argv: list[str]):
    """Say (process 0) what a stop cut short and how to go on, from `saved` (the checkpoint that
    holds the run so far) or, with none, from the start; exit with status 130."""
    if distributed.rank_and_world()[0] == 0:
        go_on = (f"checkpoint in {saved}. Resume with: {resume_command(argv)}" if saved else
                 f"nothing to keep yet. Start over with: {command(argv, None)}")
        print(f"stopped by {stop.requested or 'a stop signal'} {what}; {go_on}", flush=True)
    raise SystemExit(130)


def resume_run(checkpoint: Path, optimizer, out: Path, rank: int = 0) -> Begin:
    """Restore the optimizer and this process's RNGs from `checkpoint`, and (process 0) bring
    metrics.jsonl and trees.jsonl back to what it had seen, moving later records aside. Returns
    where the run goes on."""
    try:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        run_state = json.loads((checkpoint / "run_state.json").read_text())
        optimizer.load_state_dict(state["optimizer"])
    except Exception as error:  # the manifest matched, so this is not damage but another script's file
        raise SystemExit(f"--resume: cannot load {checkpoint} ({type(error).__name__}: {error}); "
                         "pass --overwrite to start over")
    rng = state["rng"][rank] if isinstance(state["rng"], list) else state["rng"]  # a list by rank (a dict before)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    begin = Begin(run_state["step"], run_state["metrics_records"], run_state.get("pending"), checkpoint)
    if rank:
        return begin
    begin.records = trim_records(out / "metrics.jsonl", run_state["metrics_records"])
    if (out / "trees.jsonl").exists():  # --save-trees: not created where it was never asked for
        trim_records(out / "trees.jsonl", run_state["step"])
    if begin.records < run_state["metrics_records"]:
        tqdm.write(f"note: metrics.jsonl held {begin.records} of the {run_state['metrics_records']} records "
                   f"{checkpoint.name} was saved after", file=sys.stderr)
    return begin


def clear_run(out: Path):
    """--overwrite: delete what a run writes into its folder (nothing else)."""
    for path in out.iterdir():
        if path.name.startswith((PREFIX, "." + PREFIX, "metrics.", "trees.", "curves.", "run.json")) \
                or path.name == "trees":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def resume_command(argv: list[str]) -> str:
    """The command that resumes a run: the one that started it (`argv`), with --resume."""
    return command(argv, "--resume")


def start_over_command(out: Path, argv: list[str]) -> str:
    """The command that starts the run again: with --overwrite where the folder still holds its records."""
    return command(argv, "--overwrite" if (out / "metrics.jsonl").exists() else None)


KEPT_ENVIRONMENT = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")  # they change the speed or the device


def command(argv: list[str], flag: str | None) -> str:
    """`python train_gsm8k.py` (under torchrun, with as many processes) with `argv` less --resume and
    --overwrite, plus `flag`, after the environment variables of KEPT_ENVIRONMENT this run started with."""
    environment = [f"{name}={shlex.quote(os.environ[name])}" for name in KEPT_ENVIRONMENT if name in os.environ]
    processes = distributed.processes()
    launcher = f"torchrun --standalone --nproc_per_node {processes}" if processes > 1 else "python"
    arguments = [arg for arg in argv if arg not in ("--resume", "--overwrite")] + ([flag] if flag else [])
    return " ".join(environment + [f"{launcher} train_gsm8k.py", shlex.join(arguments)])


def where_to_go_on(out: Path, argv: list[str], steps: int) -> str:
    """The last complete checkpoint and the command that resumes from it, or that the run is
    complete, or (no checkpoint) the command that starts over."""
    saved = checkpoints(out)
    if not saved:
        return f"No checkpoint was saved yet; start over with: {start_over_command(out, argv)}"
    if checkpoint_step(saved[-1]) >= steps and not checkpoint_pending(saved[-1]):
        return f"The run is complete: its last checkpoint is {saved[-1]}"
    return f"The last complete checkpoint is {saved[-1]}; resume with: {resume_command(argv)}"


def closing_line(out: Path, first_step: int, steps: int, seconds: float) -> str:
    """Where the results are, the held-out scores before and after, and the time taken."""
    evaluated = [record for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "eval_lenient" in record]
    scores = {kind: " -> ".join(f"{record[f'eval_{kind}']:.0%}" for record in (evaluated[0], evaluated[-1]))
              for kind in ("strict", "lenient")}
    done = f"steps {first_step + 1}-{steps}" if steps > first_step else "the evaluation only"
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    saved = checkpoints(out)
    return (f"done: {done} in {took}; held-out Pass@1 ({evaluated[-1]['eval_questions']} questions) strict "
            f"{scores['strict']}, lenient {scores['lenient']}; metrics in {out / 'metrics.jsonl'}"
            + (f", checkpoint {saved[-1]}" if saved else ""))
