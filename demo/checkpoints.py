"""A training run's folder and its checkpoints, which never lose work and never resume wrong.

    <out>/run.lock                   locked while a run uses the folder: one run per folder
    <out>/run.json                   the run's config
    <out>/checkpoint-000008/         the newest complete checkpoint: weights, optimizer, RNG, step,
        manifest.json                written last: every file's size and SHA-256

A checkpoint is written into a temporary folder, flushed to disk, and renamed into place in one
step; the previous one is deleted only after that, so a crash at any instant leaves a complete
checkpoint behind. `newest_checkpoint` checks every file against the manifest before anything
loads it, and says in one line what is wrong and how to go on. A new run that ends before it has
anything to resume from leaves the folder as it found it.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from demo import distributed, records
from demo.models import trainable

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
    if checkpoints(out) or records.logged_steps(out / "metrics.jsonl"):
        return False
    clear_run(out)
    return True


def clear_run(out: Path):
    """--overwrite: delete what a run writes into its folder (nothing else)."""
    for path in out.iterdir():
        if path.name.startswith((PREFIX, "." + PREFIX, "metrics.", "trees.", "curves.", "run.json")) \
                or path.name == "trees":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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
# Atomic, complete checkpoints: write, verify


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


def newest_step(out: Path, step: int) -> Path | None:
    """The newest checkpoint in `out` if it holds `step` (a stop need not save it again), else None."""
    saved = checkpoints(out)
    return saved[-1] if saved and checkpoint_step(saved[-1]) == step else None


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


_write_synced = records.write_synced  # the manifest's writer (a name of its own: the save tests cut it)


# ----------------------------------------------------------------------------------------------
# The demo's checkpoints: what a resumed run needs to go on exactly as if never stopped


def rng_state() -> dict:
    """This process's random number generators: torch's, Python's, CUDA's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


@dataclasses.dataclass
class Begin:
    """Where a run starts: after `step` (0: nothing done yet) with the first `metrics_records` lines of
    metrics.jsonl kept; `pending`: the record of that step when a stop cut its evaluation short (the
    resumed run evaluates it first); `checkpoint`: the folder it resumes from."""
    step: int = 0
    metrics_records: int = 0
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


def save_step(out: Path, step: int, *, model, tokenizer, optimizer, rng: dict, metrics_records: int, cfg,
              pending: dict | None = None) -> Path | None:
    """The run's checkpoint-<step>, written by process 0 with every process's RNG state (`rng`: this
    one's); returns its folder (None in the other processes). metrics_records: the metrics.jsonl
    lines it covers; pending: the step's record when its evaluation is still to come."""
    rank, world = distributed.rank_and_world()
    states = distributed.gather([rng])  # by rank
    state = {"step": step, "metrics_records": metrics_records, "processes": world, "config": dataclasses.asdict(cfg),
             "pending": pending}
    saved = save_run(out, step, model, tokenizer, optimizer, states, state) if rank == 0 else None
    distributed.barrier()  # no process leaves before the checkpoint is whole
    return saved


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
    begin.metrics_records = records.trim_records(out / "metrics.jsonl", run_state["metrics_records"])
    if (out / "trees.jsonl").exists():  # --save-trees: not created where it was never asked for
        records.trim_records(out / "trees.jsonl", run_state["step"])
    if begin.metrics_records < run_state["metrics_records"]:
        tqdm.write(f"note: metrics.jsonl held {begin.metrics_records} of the {run_state['metrics_records']} records "
                   f"{checkpoint.name} was saved after", file=sys.stderr)
    return begin
