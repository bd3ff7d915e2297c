"""The anatomy of the tree's credit against the width N, without training: what a wider sibling
group changes before any run is spent.

For each N, one tree per question from the same model, questions and per-leaf budget (depth D,
segment L: at most D x L tokens an answer), scored by the demo's reward; then, per N:
    tied groups      sibling groups whose values span less than tau: pruned, no loss
    credited openings  depth-1 nodes with an advantage (the first step of an answer)
    |A|              the spread of the kept nodes' advantages under each norm (std, bernoulli, none)
    distinct |A|     how many different magnitudes the std norm gives (a pair only ever gets 0.71)
    tokens per leaf  generated tokens over leaves: the shared prefixes' saving
Every tree is scored once; each norm re-reads the same values.

    python -m probes.anatomy --model out/smollm2 --widths 2 4 8 --questions 32 --out out/anatomy
    python -m probes.anatomy --show out/anatomy        # the table again, and the picture
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from pictures.plots import pyplot
from reward import SYSTEM_PROMPTS, chat_prompt, gsm8k_reward, word_problems
from treerpo import NORMS, assign_advantages, leaves, nodes, response_tokens, sample_trees


def sample_scored(model, tokenizer, problems, *, branch, depth, segment_tokens, temperature, batch, seed):
    """One tree per problem (rewards on the leaves, strict), `batch` questions a sampling call."""
    torch.manual_seed(seed)
    roots = []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        prompts = [chat_prompt(tokenizer, problem["question"], "lines") for problem in chunk]
        for root, problem in zip(sample_trees(model, tokenizer, prompts, branch=branch, depth=depth,
                                              segment_tokens=segment_tokens, temperature=temperature), chunk):
            for leaf in leaves(root):
                text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
                leaf.reward = gsm8k_reward(text, problem["answer"], strict=True)
            roots.append(root)
        print(f"  N={branch}: {len(roots)}/{len(problems)} trees", flush=True)
    return roots


def anatomy(roots, tau: float = 0.1) -> dict:
    """The figures of one width's trees (see the module's docstring)."""
    figures = {}
    for norm in NORMS:
        for root in roots:
            assign_advantages(root, norm=norm, tau=tau)
        kept = [abs(node.advantage) for root in roots for node in nodes(root)[1:] if node.advantage is not None]
        figures[f"abs_A_{norm}"] = quantiles(kept)
        if norm == "std":
            groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
            openings = [child for root in roots for child in root.children]
            figures |= {"groups": len(groups),
                        "tied_groups": sum(group[0].advantage is None for group in groups) / len(groups),
                        "credited_openings": sum(node.advantage is not None for node in openings) / len(openings),
                        "kept_nodes": len(kept), "distinct_abs_A": len({round(value, 3) for value in kept}),
                        "abs_A_values_std": sorted(round(value, 3) for value in kept)}
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    generated = sum(len(node.tokens) for root in roots for node in nodes(root)[1:])
    figures |= {"leaves_per_question": len(all_leaves) / len(roots), "tokens_per_leaf": generated / len(all_leaves),
                "answer_tokens_per_leaf": sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves),
                "reward": sum(leaf.reward for leaf in all_leaves) / len(all_leaves),
                "questions_with_a_right_leaf": sum(any(leaf.reward for leaf in leaves(root)) for root in roots) / len(roots)}
    return figures


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    cuts = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"n": len(values), "mean": round(statistics.fmean(values), 3), "p10": round(cuts[0], 3),
            "median": round(statistics.median(values), 3), "p90": round(cuts[-1], 3)}


def table(results: dict) -> str:
    lines = ["| N | trees | leaves/question | tokens generated/leaf | tied groups (pruned) | openings credited | "
             "kept nodes | distinct abs(A), std | abs(A) std: p10 / median / p90 | bernoulli: median / p90 | none: median / p90 |",
             "| --- " * 11 + "|"]
    for width, figures in sorted(results.items(), key=lambda item: int(item[0])):
        std, bern, none = figures["abs_A_std"], figures["abs_A_bernoulli"], figures["abs_A_none"]
        lines.append(f"| {width} | {figures['trees']} | {figures['leaves_per_question']:.1f} | "
                     f"{figures['tokens_per_leaf']:.1f} | {figures['tied_groups']:.0%} | {figures['credited_openings']:.0%} | "
                     f"{figures['kept_nodes']} | {figures['distinct_abs_A']} | "
                     f"{std.get('p10', 0):.2f} / {std.get('median', 0):.2f} / {std.get('p90', 0):.2f} | "
                     f"{bern.get('median', 0):.2f} / {bern.get('p90', 0):.2f} | {none.get('median', 0):.2f} / {none.get('p90', 0):.2f} |")
    return "\n".join(lines)


def picture(results: dict, path: Path) -> Path:
    """|A| under the std norm, one histogram a width: a pair gives one bar at 0.71, wider groups a spread."""
    plt = pyplot("the anatomy's picture")
    widths = sorted(results, key=int)
    figure, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3), sharey=False)
    for axis, width in zip(axes if len(widths) > 1 else [axes], widths):
        values = results[width]["abs_A_values_std"]
        axis.hist(values, bins=[i / 20 for i in range(0, 61)], color="#4c72b0")
        axis.set_title(f"N={width}: {results[width]['tied_groups']:.0%} of groups tied, "
                       f"{results[width]['credited_openings']:.0%} of openings credited", fontsize=9)
        axis.set_xlabel("|A| of a kept node (std norm)")
    axes[0].set_ylabel("nodes") if len(widths) > 1 else axes.set_ylabel("nodes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (python -m offline.smollm2 out/smollm2)")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--segment-tokens", type=int, default=24)
    parser.add_argument("--questions", type=int, default=32, help="of --data steps' train split, the first ones")
    parser.add_argument("--batch", type=int, default=4, help="questions a sampling call")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="a folder for anatomy.json and anatomy.png (needs matplotlib); without it, "
                                      "the table alone")
    parser.add_argument("--show", metavar="FOLDER", help="print the table of an earlier run and draw its picture")
    args = parser.parse_args(argv)
    if args.out or args.show:
        pyplot("the anatomy's picture")  # before minutes of sampling: the picture is asked for
    if args.show:
        results = json.loads((Path(args.show) / "anatomy.json").read_text())["widths"]
        print(table(results))
        print(f"wrote {picture(results, Path(args.show) / 'anatomy.png')}")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    problems = word_problems("steps", "train")[:args.questions]
    results = {}
    for width in args.widths:
        roots = sample_scored(model, tokenizer, problems, branch=width, depth=args.depth,
                              segment_tokens=args.segment_tokens, temperature=args.temperature,
                              batch=args.batch, seed=args.seed)
        results[str(width)] = {"trees": len(roots), **anatomy(roots)}
    print(table(results))
    if args.out:  # the figures and the picture, kept
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {key: value for key, value in vars(args).items() if key not in ("show", "out")}
        settings["system_prompt"] = SYSTEM_PROMPTS["lines"]
        (out / "anatomy.json").write_text(json.dumps({"settings": settings, "widths": results}, indent=1))
        print(f"wrote {picture(results, out / 'anatomy.png')}")


if __name__ == "__main__":
    main()
