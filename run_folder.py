"""A training run's folder that never loses work and never resumes wrong (used by train_gsm8k.py).

    <out>/run.lock                   the pid of the run using the folder: one run per folder
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

import errno
import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

MANIFEST = "manifest.json"
PREFIX = "checkpoint-"


# ----------------------------------------------------------------------------------------------
# One run per folder


def take_lock(out: Path) -> Path:
    """Create <out>/run.lock holding this process's pid; refuse if a live process holds it. A lock
    left by a run that was killed (its pid is gone) is taken over."""
    lock = out / "run.lock"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and _alive(owner):
                raise SystemExit(f"--out {out} is in use by another run (pid {owner}): wait for it to end, "
                                 "or pass another --out")
            lock.unlink(missing_ok=True)  # stale: its run was killed
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(str(os.getpid()))
        return lock
    raise SystemExit(f"--out {out}: could not take {lock}; another run may be starting there")


def release_lock(lock: Path):
    if _lock_owner(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
    folders = sorted(folder for folder in out.glob(f"{PREFIX}*") if folder.is_dir())
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


def trim_records(path: Path, records: int) -> int:
    """Keep the first `records` lines of a JSON Lines file (<out>/metrics.jsonl: those the checkpoint
    saw); move any later line, and a partial last line, to <name>.discarded.jsonl beside it. Returns
    how many are kept."""
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    kept = []
    for line in lines[:-1][:records]:  # lines[-1] follows the last newline: partial, or b""
        try:
            json.loads(line)
        except ValueError:
            break
        kept.append(line)
    moved = [line for line in lines[len(kept):] if line.strip()]
    if moved:
        with open(path.with_suffix(".discarded.jsonl"), "ab") as file:
            file.write(b"".join(line + b"\n" for line in moved))
    _write_synced(path, b"".join(line + b"\n" for line in kept).decode())
    return len(kept)


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: finish the step, checkpoint it, say how to go on


class GracefulStop:
    """While active, the first SIGINT or SIGTERM only sets `requested` (the loop stops at its next
    safe point); a second one raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.requested = None  # the signal's name once one came
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        print(f"\n{self.requested}: stopping after this step and saving a checkpoint; "
              "press Ctrl-C again to abort at once", flush=True)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
