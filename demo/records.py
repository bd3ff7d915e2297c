"""A run's records: metrics.jsonl, a strict-JSON record a step, and trees.jsonl (--save-trees), which a
resumed run brings back to exactly what its checkpoint saw (used by train_gsm8k.py).

    <out>/metrics.jsonl              one record per step, as many as the checkpoint says
    <out>/metrics.discarded.jsonl    records a resume moved aside (logged after the checkpoint)
    <out>/trees.jsonl                with --save-trees: every step's trees, trimmed the same way
    <out>/trees/step_K.txt           with --show-tree-every: the first tree of the step, as text
"""

import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from treerpo import leaves, nodes, response_tokens


class Log:
    """metrics.jsonl, opened for appending by process 0 (`kept`: how many records it holds), and the
    history of training records that the run's health is read from (on resume: as it was)."""

    def __init__(self, out: Path, owner: bool, kept: int, history: list[dict]):
        self.path, self.owner, self.kept, self.history = out / "metrics.jsonl", owner, kept, history

    def __enter__(self):
        self.file = open(self.path, "a") if self.owner else None
        return self

    def append(self, record: dict):
        if self.file:
            self.file.write(json_record(record) + "\n")
            self.file.flush()  # a crash or a stop keeps every finished step
        self.kept += 1
        self.history += [record] if record["step"] else []

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


def json_record(record: dict) -> str:
    """One line of strict JSON: numpy and torch scalars as plain numbers, NaN and infinities as null."""
    def plain(value):
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy or torch scalar
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    return json.dumps({key: plain(value) for key, value in record.items()}, allow_nan=False)


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
    write_synced(path, b"".join(line + b"\n" for line in kept).decode())
    return len(kept)


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


def write_synced(path: Path, text: str):
    """Write `path` and flush it to disk before returning."""
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def logged_steps(path: Path) -> list[dict]:
    """The training steps' records in metrics.jsonl (step 0, the evaluation before training, left
    out): the history the run's health is read from, restored as it was on resume."""
    return [record for record in map(json.loads, readable_lines(path)) if record.get("step", 0) > 0]


def tree_metrics(roots, method: str) -> dict:
    """What the sampled trees look like: rewards, sizes, and the failure-mode figures."""
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
    metrics = {
        "reward": sum(leaf.reward for leaf in all_leaves) / len(all_leaves),
        "solve_rate": sum(any(leaf.reward > 0 for leaf in leaves(root)) for root in roots) / len(roots),
        "leaves": len(all_leaves),
        "segments": sum(len(nodes(root)) - 1 for root in roots),
        "tokens_generated": sum(len(node.tokens) for root in roots for node in nodes(root)[1:]),
        "response_tokens": sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves),
        "truncated": sum(not leaf.finished for leaf in all_leaves) / len(all_leaves),  # no EOS by the last level
    }
    if method != "treepo":  # TreePO credits leaves, not sibling groups: it prunes none
        metrics["pruned_groups"] = sum(group[0].advantage is None for group in groups) / len(groups)
    return metrics


def closing_line(out: Path, first_step: int, cfg, seconds: float, checkpoint: Path | None) -> str:
    """Where the results are, the held-out scores before and after, and the time taken."""
    steps = cfg.steps
    evaluated = [record for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "eval_lenient" in record]
    scores = {kind: " -> ".join(f"{record[f'eval_{kind}']:.0%}" for record in (evaluated[0], evaluated[-1]))
              for kind in ("strict", "lenient")}
    done = f"steps {first_step + 1}-{steps}" if steps > first_step else "the evaluation only"
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return (f"done: {done} in {took}; held-out Pass@1 ({evaluated[-1]['eval_questions']} questions) strict "
            f"{scores['strict']}, lenient {scores['lenient']}; metrics in {out / 'metrics.jsonl'}"
            + (f", checkpoint {checkpoint}" if checkpoint else "")
            + (" (a smoke run: a tiny random model answers nothing; it checks that every path runs)" if cfg.smoke else ""))
