"""A run's records: metrics.jsonl (a strict-JSON line a step; step 0: before training) and, with --save-trees,
trees.jsonl (every step's trees, for probes/credit.py); both end where the checkpoint does on --resume."""

import json
import math
from pathlib import Path

from treerpo import leaves, nodes, response_tokens


def append(path: Path, record: dict):
    """One line of strict JSON: numpy and torch scalars as numbers, NaN and infinities as null."""
    def plain(value):
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and not math.isfinite(value) else value
    with open(path, "a") as file:
        file.write(json.dumps({key: plain(value) for key, value in record.items()}, allow_nan=False) + "\n")


def keep_first(path: Path, count: int):
    """Keep the first `count` lines of a JSON Lines file (those a checkpoint saw)."""
    if path.exists():
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:count]))


def trees_record(step: int, roots: list, problems: list[dict]) -> dict:
    """A line of trees.jsonl: each tree's problem and nodes, depth-first (parent index, -1: the prompt)."""
    trees = []
    for root, problem in zip(roots, problems):
        index = {node: number for number, node in enumerate(nodes(root))}
        trees.append({"question": problem["question"], "answer": problem["answer"], "nodes": [
            {"parent": index.get(node.parent, -1), "tokens": node.tokens, "finished": node.finished,
             "reward": node.reward, "value": node.value, "advantage": node.advantage} for node in index]})
    return {"step": step, "trees": trees}


def tree_metrics(roots: list) -> dict:
    """What the sampled trees look like: rewards, sizes, and the failure-mode figures."""
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
    return {"reward": sum(leaf.reward for leaf in all_leaves) / len(all_leaves),
            "solve_rate": sum(any(leaf.reward > 0 for leaf in leaves(root)) for root in roots) / len(roots),
            "leaves": len(all_leaves), "segments": sum(len(nodes(root)) - 1 for root in roots),
            "tokens_generated": sum(len(node.tokens) for root in roots for node in nodes(root)[1:]),
            "response_tokens": sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves),
            "truncated": sum(not leaf.finished for leaf in all_leaves) / len(all_leaves),  # no EOS by the last level
            "pruned_groups": sum(all(node.advantage is None for node in group) for group in groups) / len(groups)}
