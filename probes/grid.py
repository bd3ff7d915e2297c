"""Where the tree's signal is, before any training: the anatomy of sampled trees over a grid of
temperatures and tree layouts, the same questions in every cell.

    python -m probes.grid --model out/qwen05 --data GSM8K_FOLDER --dtype bf16 --questions 16 \
        --cells 0.6:4x192,4x192 0.8:4x192,4x192 1.0:4x192,4x192 --out docs/runs/grid05

A cell is TEMPERATURE:LAYOUT, the layout one NxL a level (children a node x tokens a segment):
`4x192,4x192` is the demo's default tree, `4x96,4x288` branches earlier, `8x192,2x192` is wider at
the first level. Or TEMPERATURE:fork:MxNxT:BUDGET, forks where the answer is still open (TreeRL's
EPTree): M whole answers of up to BUDGET tokens; in each, the N tokens the model was least sure of
(the highest -log p of the sampled token; never a branch's first token, nor after a token that holds
"answer", "boxed" or "####") become fork points, each given T new continuations that draw that token
again, from the same prefix, up to the budget. An answer then splits at its fork points into a chain
of nodes, and each fork's node has the answer's own rest and the T new ones as children. The forks
re-encode their prefix (one prefill each) rather than crop a cache: what they sample is the same.
Each cell samples one tree per question (the first --questions of the train split
in the demo's seed-0 order, the demo's prompt or --system-prompt, the strict reward), with the same
sampling seed, and reports:
    tied groups by level   sibling groups whose values span less than tau 0.1 (no loss)
    openings credited      first-level nodes with an advantage
    trained / sampled      tokens of nodes with an advantage over tokens generated
    reward                 the mean leaf reward
    cut                    leaves that reached the answer budget without EOS
    answer tokens          the mean answer length over leaves
and, per norm (std, bernoulli, none, and step: each demo step's --batch trees scaled together), the
mean |A| of the first level's kept nodes, and the best opening's A by its group's value gap (a
second table). The tables are printed; --out keeps each cell's figures in cells.json (a later run
of the same settings adds its cells there) and --show prints the tables from them.
"""

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from train_gsm8k import Config  # the demo's --layout format
from reward import SYSTEM_PROMPTS, chat_prompt, gsm8k_reward, load_problems
from treerpo import (NORMS, TreeNode, assign_advantages, generate_settings, grow_trees, leaves, nodes, pad_rows,
                     response_tokens, sample_trees, scale_by_step, special_ids)


def sample_cell(model, tokenizer, problems, temperature: float, branches, segments, *, system_prompt, batch,
                dtype: str, seed: int, strict: bool = True) -> list:
    """One scored tree per problem, `batch` problems a sampling call; returns the roots."""
    torch.manual_seed(seed)
    roots = []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        prompts = [chat_prompt(tokenizer, problem["question"], system_prompt) for problem in chunk]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            trees = sample_trees(model, tokenizer, prompts, branch=branches, depth=len(branches),
                                 segment_tokens=segments, temperature=temperature)
        roots += scored(trees, chunk, tokenizer, strict)
        print(f"  {len(roots)}/{len(problems)} trees", flush=True)
    return roots


def scored(trees: list, problems: list, tokenizer, strict: bool) -> list:
    """`trees`, every leaf rewarded for its whole answer to its problem."""
    for root, problem in zip(trees, problems):
        for leaf in leaves(root):
            text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
            leaf.reward = gsm8k_reward(text, problem["answer"], strict=strict)
    return trees


MARKERS = ("answer", "boxed", "####")  # no fork after a token that holds one: the answer is being written


def fork_points(chain: TreeNode, tokenizer, forks: int) -> list[int]:
    """The positions of the `forks` tokens of a sampled answer with the highest -log p, in order: not the
    first token, nor one after a token that holds an answer marker."""
    texts = [tokenizer.decode([token]).lower() for token in chain.tokens]
    last = next((index for index, text in enumerate(texts) if any(marker in text for marker in MARKERS)),
                len(texts) - 1)
    ranked = sorted(range(1, last + 1), key=lambda index: chain.logprobs[index])  # the least sure first
    return sorted(ranked[:forks])


def fork_cell(model, tokenizer, problems, temperature: float, chains: int, forks: int, continuations: int,
              budget: int, *, system_prompt, batch, dtype: str, seed: int, strict: bool = True) -> list:
    """One scored fork tree per problem (see the module's docstring); returns the roots."""
    torch.manual_seed(seed)
    pad_id, eos_ids = special_ids(model, tokenizer)
    roots = []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        prompts = [chat_prompt(tokenizer, problem["question"], system_prompt) for problem in chunk]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            trees = sample_trees(model, tokenizer, prompts, branch=chains, depth=1, segment_tokens=budget,
                                 temperature=temperature, return_logprobs=True)
            points = [(root, chain, k) for root in trees for chain in root.children
                      for k in fork_points(chain, tokenizer, forks)]
            starts = [TreeNode(tokens=root.tokens + chain.tokens[:k]) for root, chain, k in points]
            for first in range(0, len(starts), batch * chains):  # rows a call, as the answers were sampled
                group = starts[first:first + batch * chains]
                input_ids, mask = pad_rows([node.tokens for node in group], pad_id, side="left", device=model.device)
                model.eval()
                generation = generate_settings(model, pad_id, eos_ids, temperature, 1.0, True)
                grow_trees(model, group, input_ids, mask, branches=[continuations], segments=[budget], eos_ids=eos_ids,
                           logprob_temperature=None, **generation)
        for root in trees:
            split_chains(root, {chain: [(k, start) for (_, c, k), start in zip(points, starts) if c is chain]
                                for chain in root.children}, budget)
        roots += scored(trees, chunk, tokenizer, strict)
        print(f"  {len(roots)}/{len(problems)} trees", flush=True)
    return roots


def split_chains(root: TreeNode, forks: dict, budget: int):
    """Rebuild each answer under `root` as a chain of nodes split at its fork points, each fork's node
    with the answer's rest and the fork's continuations (cut at the answer budget) as children."""
    root.children = []
    for chain, points in forks.items():
        cuts = [k for k, _ in points] + [len(chain.tokens)]
        node = TreeNode(tokens=chain.tokens[:cuts[0]], parent=root, depth=1, finished=not points and chain.finished)
        root.children.append(node)
        for (k, start), end in zip(points, cuts[1:]):
            rest = TreeNode(tokens=chain.tokens[k:end], parent=node, depth=node.depth + 1,
                            finished=end == len(chain.tokens) and chain.finished)
            node.children = [rest] + [TreeNode(tokens=new.tokens[:budget - k], parent=node, depth=node.depth + 1,
                                               finished=new.finished and len(new.tokens) <= budget - k)
                                      for new in start.children]
            node = rest


GAPS = (0.25, 0.5, 0.75, 1.0)  # the bins of a group's value gap (max - min): (tau, 0.25], (0.25, 0.5], ...


def credit(roots, norm: str, batch: int, tau: float) -> None:
    """Advantages under `norm`; "step" scales each `batch` of trees (a demo step's questions) together."""
    for root in roots:
        assign_advantages(root, norm="none" if norm == "step" else norm, tau=tau)
    for start in range(0, len(roots), batch) if norm == "step" else []:
        scale_by_step(roots[start:start + batch])


def figures(roots, batch: int, tau: float = 0.1) -> dict:
    """The cell's anatomy (see the module's docstring)."""
    result = {"mean_abs_A_first_level": {}, "best_A_by_gap": {}}
    for norm in (*NORMS, "step", "std"):  # the std norm last: the figures below are its
        credit(roots, norm, batch, tau)
        kept = [abs(child.advantage) for root in roots for child in root.children if child.advantage is not None]
        result["mean_abs_A_first_level"][norm] = round(statistics.fmean(kept), 3) if kept else None
        result["best_A_by_gap"][norm] = best_by_gap(roots)
    generated = [node for root in roots for node in nodes(root)[1:]]
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    depth = max(node.depth for node in generated)
    groups = {level: [parent.children for root in roots for parent in nodes(root)
                      if parent.children and parent.depth == level - 1] for level in range(1, depth + 1)}
    openings = [child for root in roots for child in root.children]
    return result | {
        "questions": len(roots), "leaves": len(all_leaves),
        "tied_by_level": [round(sum(group[0].advantage is None for group in groups[level]) / max(len(groups[level]), 1), 3)
                          for level in groups],
        "groups_by_level": [len(groups[level]) for level in groups],
        "openings_credited": round(sum(node.advantage is not None for node in openings) / len(openings), 3),
        "tokens_sampled": sum(len(node.tokens) for node in generated),
        "tokens_trained": sum(len(node.tokens) for node in generated if node.advantage is not None),
        "reward": round(sum(leaf.reward for leaf in all_leaves) / len(all_leaves), 4),
        "cut": round(sum(not leaf.finished for leaf in all_leaves) / len(all_leaves), 4),
        "answer_tokens": round(sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves), 1)}


def best_by_gap(roots) -> dict:
    """For the kept first-level groups, binned by their value gap: [mean A of the best opening, groups]."""
    bins = {gap: [] for gap in GAPS}
    for root in roots:
        if root.children and root.children[0].advantage is not None:
            values = [child.value for child in root.children]
            gap = next(edge for edge in GAPS if max(values) - min(values) <= edge + 1e-9)
            bins[gap].append(max(child.advantage for child in root.children))
    return {str(gap): [round(statistics.fmean(best), 2) if best else None, len(best)] for gap, best in bins.items()}


def table(cells: dict) -> str:
    norms = (*NORMS, "step")
    lines = ["| cell (T: layout) | leaves | tied groups by level | openings credited | tokens trained / sampled | "
             f"mean leaf reward | cut at the budget | answer tokens | mean abs(A), first level: {' / '.join(norms)} |",
             "| --- " * 9 + "|"]
    for name, cell in cells.items():
        tied = " / ".join(f"{share:.0%}" for share in cell["tied_by_level"])
        sizes = " / ".join("-" if cell["mean_abs_A_first_level"].get(norm) is None
                           else f"{cell['mean_abs_A_first_level'][norm]:.2f}" for norm in norms)
        lines.append(f"| {name} | {cell['leaves']} | {tied} | {cell['openings_credited']:.0%} | "
                     f"{cell['tokens_trained']:,} / {cell['tokens_sampled']:,} "
                     f"({cell['tokens_trained'] / cell['tokens_sampled']:.0%}) | {cell['reward']:.1%} | {cell['cut']:.1%} | "
                     f"{cell['answer_tokens']:.0f} | {sizes} |")
    return "\n".join(lines)


def gap_table(cells: dict) -> str:
    """The best opening's A by its group's value gap, per norm, for the cells that recorded it."""
    edges = ["0.1-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]
    lines = ["| cell | norm | " + " | ".join(f"gap {edge}" for edge in edges) + " |", "| --- " * 6 + "|"]
    for name, cell in cells.items():
        for norm, by_gap in cell.get("best_A_by_gap", {}).items():
            lines.append(f"| {name} | {norm} | " + " | ".join("-" if mean is None else f"{mean:+.2f} ({count})"
                                                           for mean, count in by_gap.values()) + " |")
    return "\n".join(lines)


def kept_cells(out, settings: dict) -> dict:
    """The cells an earlier run kept in `out`, when its settings (all but the cells) are these."""
    path = Path(out) / "cells.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if {k: v for k, v in earlier["settings"].items() if k != "cells"} != {k: v for k, v in settings.items() if k != "cells"}:
        raise SystemExit(f"{path} holds cells of other settings ({earlier['settings']}): give another --out")
    return earlier["cells"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (offline/qwen05.py, offline/smollm2.py)")
    parser.add_argument("--data", default="smoke", help="the demo's --data: a GSM8K folder, steps, easy, smoke")
    parser.add_argument("--cells", nargs="+", default=["0.6:4x192,4x192"], help="TEMPERATURE:NxL,NxL,... each")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--system-prompt", default="demo", help=f"a preset ({', '.join(SYSTEM_PROMPTS)}) or text")
    parser.add_argument("--batch", type=int, default=8, help="questions a sampling call (the demo's default: 8)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="a folder to keep cells.json in")
    parser.add_argument("--show", metavar="FOLDER", help="print the table of an earlier run's cells.json")
    args = parser.parse_args(argv)
    if args.show:
        cells = json.loads((Path(args.show) / "cells.json").read_text())["cells"]
        print(table(cells) + "\n\n" + gap_table(cells))
        return
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "show")}
    cells = kept_cells(args.out, settings) if args.out else {}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problems = load_problems(args.data, "train")
    random.Random(0).shuffle(problems)  # the demo's training order at seed 0
    problems = problems[:args.questions]
    for cell in args.cells:
        temperature, tree = cell.split(":", 1)
        print(f"cell {cell}", flush=True)
        settings_of_cell = dict(system_prompt=args.system_prompt, batch=args.batch, dtype=args.dtype, seed=args.seed)
        if tree.startswith("fork:"):
            shape, budget = tree.split(":")[1:]
            roots = fork_cell(model, tokenizer, problems, float(temperature), *map(int, shape.split("x")), int(budget),
                              **settings_of_cell)
        else:
            roots = sample_cell(model, tokenizer, problems, float(temperature), *Config(layout=tree).levels(),
                                **settings_of_cell)
        cells[cell] = figures(roots, args.batch)
        if args.out:  # kept after every cell: a run stopped later keeps what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cells.json").write_text(json.dumps({"settings": settings | {"cells": list(cells)}, "cells": cells}, indent=1))
    print(table(cells) + "\n\n" + gap_table(cells))


if __name__ == "__main__":
    main()
