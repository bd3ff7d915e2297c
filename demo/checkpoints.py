"""The run's folder: one run at a time, and one checkpoint (the weights and tokenizer, trainer_state.pt with
AdamW and every process's random generators, state.json), written under a temporary name and renamed when
whole; only then is the older one deleted (as HF Trainer does). A kill at any moment leaves one whole, and
a file missing or cut short is refused in one line on --resume."""

import json
import os
import random
import shutil
from pathlib import Path

import torch
from filelock import FileLock, Timeout

PREFIX = "checkpoint-"


def save(out: Path, model, tokenizer, optimizer, rng: list, state: dict) -> Path:
    """Write <out>/checkpoint-<step> (model, tokenizer, optimizer, `rng` by rank, `state`); never non-finite weights."""
    if not all(torch.isfinite(parameter).all() for parameter in model.parameters()):
        raise SystemExit(f"step {state['step']}: the weights are not finite, so no checkpoint was saved")
    final = out / f"{PREFIX}{state['step']:06d}"
    temporary = out / f".{final.name}.partial"  # hidden: not a checkpoint until renamed
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, temporary / "trainer_state.pt")
    (temporary / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)  # this step's, from an attempt that was resumed
    os.replace(temporary, final)
    for old in out.glob(f"*{PREFIX}*"):  # only now: until the rename, the older one was the one to resume
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def newest(out: Path) -> Path | None:
    return max(out.glob(f"{PREFIX}*"), default=None)


def state(folder: Path) -> dict:
    """The checkpoint's state.json; SystemExit, in one line, if it is missing or cut short."""
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(damaged(folder, error))


def restore(folder: Path, optimizer, rank: int) -> dict:
    """Load the optimizer and this process's random generators from `folder`; returns its state."""
    try:
        saved = torch.load(folder / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        mine = saved["rng"][rank]
    except Exception as error:  # missing, cut short (torch's loader raises several kinds), or another layout
        raise SystemExit(damaged(folder, error))
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    return state(folder)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def damaged(folder: Path, error: BaseException) -> str:
    return (f"--resume: {folder} is damaged, or an earlier train_gsm8k.py's ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:160]}); --overwrite starts over (its weights load with --model)")


def hold(out: Path) -> FileLock:
    """Hold <out>/run.lock while the run lasts (released however the process ends); another run is refused."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out / "run.lock", timeout=0)
        lock.acquire()
    except Timeout:
        raise SystemExit(f"--out {out} is in use by another run: wait for it to end, or pass another --out")
    except OSError as error:
        raise SystemExit(f"--out {out}: cannot create the folder ({error})")
    return lock


def holds_run(out: Path) -> bool:
    """Whether `out` holds a run worth keeping: a checkpoint, or the record of a trained step."""
    records = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return (out.is_dir() and newest(out) is not None) or any(not line.startswith('{"step": 0,') for line in records)


def clear(out: Path):
    """--overwrite: delete what a run writes into its folder, and nothing else."""
    for path in out.iterdir():
        if PREFIX in path.name or path.name in ("metrics.jsonl", "trees.jsonl", "run.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
