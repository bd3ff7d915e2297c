"""The credit, made visible: what advantage does each method give an answer's opening, by what the
opening already says? Reads the trees that `train_gsm8k.py --save-trees` wrote.

On the two-step problems (`--data steps`: a first result, then the answer), each opening is
classified by the numbers in its text:
    right intermediate   it holds the first step's correct result (e.g. "4 + 3 = 7" for 4 + 3 + 2)
    final answer         it holds the final answer without the intermediate
    wrong number         it holds a number that is neither, nor one of the question's
    no result yet        only the question's numbers, or none
TreeRPO's opening is a depth-1 segment, trained with its own advantage (the sibling comparison of
what followed it). GRPO's opening is the first --segment-tokens tokens of an answer, trained with
the answer's advantage. If tree credit works, openings with the right intermediate get a clearly
positive advantage in TreeRPO before the final answer is reliable. Problems whose intermediate or
final answer also appears in the question are left out (the class would be ambiguous). The runs
of one method (folders named <method>-s<seed>) are pooled.

    python -m probes.credit --model out/smollm2 --segment-tokens 12 out/credit/treerpo-s* out/credit/grpo16-s*
    python -m probes.credit --model out/smollm2 --show 2 out/credit/treerpo-s0      # two trees, as format_tree draws them
    python -m probes.credit --summary out/credit/*-s*          # accuracy, tokens, seconds, tree shape: each run, each method
    python -m probes.credit --model out/smollm2 --credit treerl docs/runs/credit4b/treerpo4-s0   # the same trees, credited
                                                               # with a root term (treerl, grpo or treepo) instead

--credit also prints the share of the sampled tokens that the credit trains (an advantage other than 0).
"""

import argparse
import gzip
import json
import statistics
from pathlib import Path

import treepo
from reward import intermediate_result, numbers_in, reference_answer
from pictures.tree_text import format_tree
from pictures.plots import read_records
from treerpo import TreeNode, assign_advantages, nodes

CLASSES = ("right intermediate", "final answer", "wrong number", "no result yet")


def phases(last_step: int, count: int = 4) -> tuple[tuple[int, int], ...]:
    """`count` spans of equal length covering steps 1..last_step: (1, 5), ..., (16, 20) for 20 steps."""
    length = -(-last_step // count)  # the ceiling
    return tuple((low, min(low + length - 1, last_step)) for low in range(1, last_step + 1, length))


def opening_class(text: str, question: str, intermediate: str, final: str) -> str:
    numbers = set(numbers_in(text))
    if intermediate in numbers:
        return "right intermediate"
    if final in numbers:
        return "final answer"
    return "wrong number" if numbers - set(numbers_in(question)) else "no result yet"


def rebuild(record: dict) -> TreeNode:
    """A tree of `demo.records.trees_record` as TreeNodes (root first)."""
    built = []
    for node in record["nodes"]:
        parent = built[node["parent"]] if node["parent"] >= 0 else None
        tree_node = TreeNode(tokens=node["tokens"], parent=parent, depth=parent.depth + 1 if parent else 0,
                             finished=node["finished"], reward=node["reward"], value=node["value"],
                             advantage=node["advantage"])
        if parent:
            parent.children.append(tree_node)
        built.append(tree_node)
    return built[0]


def two_step(record: dict) -> tuple[str, str] | None:
    """(intermediate, final) of a two-step problem whose classes are unambiguous, else None."""
    intermediate, final = intermediate_result(record["answer"]), reference_answer(record["answer"])
    question_numbers = set(numbers_in(record["question"]))
    if intermediate is None or intermediate in question_numbers or final in question_numbers or intermediate == final:
        return None
    return intermediate, final


def credited_trees(run: Path, credit: str = "saved"):
    """(step, tree record, root) for every saved tree, its advantages as saved, or recomputed a step at a
    time from its rewards with another credit: "sibling" (TreeRPO), "treerl" or "grpo" (a root term of
    treerpo.assign_advantages), or "treepo" (treepo.py's per leaf, a node the mean of its leaves')."""
    by_step = {}
    for step, tree in saved_trees(run):
        by_step.setdefault(step, []).append(tree)
    for step, trees in by_step.items():
        roots = [rebuild(tree) for tree in trees]
        if credit == "treepo":
            treepo.assign_treepo_advantages(roots)
            roots = treepo.weighted_trees(roots)
        elif credit != "saved":
            for root in roots:
                assign_advantages(root, root_term=None if credit == "sibling" else credit)
        yield from ((step, tree, root) for tree, root in zip(trees, roots))


def trained_share(run: Path, credit: str = "saved") -> float:
    """The share of the sampled tokens whose node the credit trains (an advantage other than 0)."""
    trained = sampled = 0
    for _, _, root in credited_trees(run, credit):
        for node in nodes(root)[1:]:
            sampled += len(node.tokens)
            trained += len(node.tokens) * bool(node.advantage)
    return trained / sampled


def openings(run: Path, tokenizer, segment_tokens: int, credit: str = "saved"):
    """(step, class, advantage or None) for every opening of every unambiguous two-step tree."""
    for step, tree, root in credited_trees(run, credit):
        known = two_step(tree)
        if known is None:
            continue
        for child in root.children:
            tokens = child.tokens[:segment_tokens]  # a GRPO answer: its first L tokens; a tree: the segment
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            yield step, opening_class(text, tree["question"], *known), child.advantage


def credit_table(runs: list[Path], tokenizer, segment_tokens: int, credit: str = "saved") -> dict:
    """{class: {phase: (mean advantage over trained openings, trained, all, trained with A > 0)}} over
    the runs' openings, in four phases of the runs' steps; phase "all" is every step."""
    found = [(step, name, advantage) for run in runs
             for step, name, advantage in openings(run, tokenizer, segment_tokens, credit)]
    spans = phases(max((step for step, _, _ in found), default=4))
    cells = {name: {phase: [] for phase in spans + ("all",)} for name in CLASSES}
    for step, name, advantage in found:
        cells[name]["all"].append(advantage)
        for phase in spans:
            if phase[0] <= step <= phase[1]:
                cells[name][phase].append(advantage)
    table = {}
    for name, by_phase in cells.items():
        table[name] = {}
        for phase, advantages in by_phase.items():
            trained = [advantage for advantage in advantages if advantage is not None]
            table[name][phase] = (sum(trained) / len(trained) if trained else None, len(trained), len(advantages),
                                  sum(advantage > 0 for advantage in trained))
    return table


def markdown(title: str, table: dict) -> str:
    spans = [phase for phase in next(iter(table.values())) if phase != "all"]
    header = "| opening | " + " | ".join(f"steps {low}-{high}" for low, high in spans) + " | all steps |"
    lines = [f"{title}: mean advantage of the opening (trained openings / all openings)", "", header,
             "|" + " --- |" * (len(spans) + 2)]
    for name, by_phase in table.items():
        cells = [f"{mean:+.2f} ({trained}/{count})" if mean is not None else f"- (0/{count})"
                 for mean, trained, count, _ in by_phase.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    positive = [f"{name} {by_phase['all'][3]}/{by_phase['all'][1]}" for name, by_phase in table.items()]
    lines += ["", "trained openings with a positive advantage, all steps: " + ", ".join(positive)]
    return "\n".join(lines)


def method_of(run: Path) -> str:
    """The method a run folder stands for: its name without the "-s<seed>" ending."""
    name, _, seed = run.name.rpartition("-s")
    return name if seed.isdigit() else run.name


def show_trees(run: Path, tokenizer, count: int) -> str:
    """The first `count` two-step trees, after step 5, whose openings got different advantages."""
    shown = []
    for step, tree in saved_trees(run):
        root = rebuild(tree)
        advantages = {child.advantage for child in root.children}
        if step > 5 and two_step(tree) and len(advantages) > 1 and None not in advantages:
            shown.append(f"step {step}: {tree['question']} (answer {reference_answer(tree['answer'])})\n"
                         + format_tree(root, tokenizer, width=44, show=("reward", "value", "advantage")))
        if len(shown) == count:
            return "\n\n".join(shown)
    return "\n\n".join(shown)


def trees_file(run: Path) -> Path | None:
    """The run's trees.jsonl, or its gzipped copy (as docs/runs keeps them), or None."""
    return next((path for path in (run / "trees.jsonl", run / "trees.jsonl.gz") if path.is_file()), None)


def saved_trees(run: Path):
    """(step, tree record) for every tree a run saved in its trees.jsonl (or trees.jsonl.gz)."""
    path = trees_file(run)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        record = json.loads(line)
        for tree in record["trees"]:
            yield record["step"], tree


def credited_openings(run: Path) -> float | None:
    """The share of all openings (depth-1 nodes; a GRPO answer) of every saved tree, every question,
    that got an advantage: their sibling group did not tie. None without trees.jsonl."""
    if trees_file(run) is None:
        return None
    advantages = [child["advantage"] for _, tree in saved_trees(run) for child in tree["nodes"] if child["parent"] == 0]
    return sum(advantage is not None for advantage in advantages) / len(advantages) if advantages else None


def tied_groups(run: Path) -> tuple[float, float | None] | None:
    """(first level, deeper levels): the share of sibling groups of two or more whose nodes all got
    no advantage (they tied, and were pruned), in every saved tree. None without trees.jsonl; the
    deeper share is None for GRPO's one-level trees."""
    if trees_file(run) is None:
        return None
    first, deeper = [], []
    for _, tree in saved_trees(run):
        children = {}
        for node in tree["nodes"]:
            if node["parent"] >= 0:
                children.setdefault(node["parent"], []).append(node["advantage"])
        for parent, advantages in children.items():
            if len(advantages) > 1:
                (first if parent == 0 else deeper).append(all(a is None for a in advantages))
    share = lambda tied: sum(tied) / len(tied) if tied else None  # noqa: E731
    return share(first), share(deeper)


def run_summary(run: Path) -> dict | None:
    """One run's figures from its metrics.jsonl and run.json: held-out accuracy at each evaluation,
    and over its training steps the generated tokens, seconds, leaves a question, kept nodes, the
    share of openings credited and of groups tied; None before its first training step."""
    records = read_records(run / "metrics.jsonl")
    steps = [record for record in records if "sample_s" in record]
    if not steps:
        return None
    evaluations = [record for record in records if "eval_strict" in record]
    settings = json.loads((run / "run.json").read_text())
    questions = settings["prompts_per_step"]
    return {"strict": [record["eval_strict"] for record in evaluations],
            "lenient": [record["eval_lenient"] for record in evaluations],
            "eval_steps": [record["step"] for record in evaluations], "steps": len(steps),
            "finished": len(steps) == settings["steps"] and evaluations[-1]["step"] == len(steps),
            "eval_tokens": evaluations[-1]["eval_response_tokens"],
            "tokens": sum(record["tokens_generated"] for record in steps),
            "seconds": sum(record["sample_s"] + record["loss_and_update_s"] for record in steps),
            "leaves_per_question": statistics.mean(record["leaves"] / questions for record in steps),
            "kept_nodes": [record["kept_nodes"] for record in steps],
            "response_tokens": statistics.mean(record["response_tokens"] for record in steps),
            "credited_openings": credited_openings(run), "tied_groups": tied_groups(run)}


def summary_tables(runs: list[Path]) -> str:
    """Markdown: a row per run, then per method the mean and spread (sd) over its seeds."""
    def percent(values):
        return " → ".join(f"{value:.1%}".replace(".0%", "%") for value in values)

    def share(value):
        return "-" if value is None else f"{value:.0%}"
    lines = ["| run | held-out strict % by evaluation | lenient % | train tokens | training s | leaves a question "
             "| kept nodes a step (min-max) | openings credited | groups tied (first level, below) "
             "| answer tokens (train mean, last eval) |", "|" + " --- |" * 10]
    methods = {}
    for run in runs:
        figures = run_summary(run)
        if figures is None:
            lines.append(f"| {run.name} (no training step yet) |" + " |" * 9)
            continue
        if figures["finished"]:  # a method's row is over finished runs only
            methods.setdefault(method_of(run), []).append(figures)
        name = run.name if figures["finished"] else f"{run.name} (to step {figures['steps']}, not in the method's row)"
        lines.append(f"| {name} | {percent(figures['strict'])} | {percent(figures['lenient'])} | "
                     f"{figures['tokens']:,} | {figures['seconds']:,.0f} | {figures['leaves_per_question']:.1f} | "
                     f"{statistics.mean(figures['kept_nodes']):.0f} ({min(figures['kept_nodes'])}-"
                     f"{max(figures['kept_nodes'])}) | {share(figures['credited_openings'])} | "
                     f"{', '.join(map(share, figures['tied_groups'] or (None,)))} | "
                     f"{figures['response_tokens']:.1f}, {figures['eval_tokens']:.1f} |")
    lines += ["", "| method | seeds | final strict % | final lenient % | best strict % | train tokens | training s "
              "| openings credited | answer tokens, last eval |", "|" + " --- |" * 9]

    def spread(values, scale=1.0, digits=1):
        values = [value * scale for value in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):,.{digits}f} ± {sd:,.{digits}f}"

    def credited(figures):
        shares = [f["credited_openings"] for f in figures]
        return "-" if None in shares else spread(shares, 100, digits=0).replace(" ±", "% ±") + "%"
    for method, figures in methods.items():
        lines.append(f"| {method} | {len(figures)} | {spread([f['strict'][-1] for f in figures], 100)} | "
                     f"{spread([f['lenient'][-1] for f in figures], 100)} | "
                     f"{spread([max(f['strict']) for f in figures], 100)} | "
                     f"{spread([f['tokens'] for f in figures], digits=0)} | {spread([f['seconds'] for f in figures], digits=0)} | "
                     f"{credited(figures)} | {spread([f['eval_tokens'] for f in figures])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="--out folders of runs made with --save-trees")
    parser.add_argument("--model", help="the model folder (for its tokenizer; not needed with --summary)")
    parser.add_argument("--segment-tokens", type=int, default=12, help="a GRPO answer's opening, in tokens")
    parser.add_argument("--show", type=int, default=0, help="instead: draw this many trees of the first run")
    parser.add_argument("--summary", action="store_true", help="instead: each run's and each method's figures")
    parser.add_argument("--credit", default="saved", choices=("saved", "sibling", "treerl", "grpo", "treepo"),
                        help="the advantages: as saved, or recomputed from the rewards with this credit")
    args = parser.parse_args()
    if args.summary:
        missing = [run for run in args.runs if not (Path(run) / "metrics.jsonl").is_file()]
        if missing:
            raise SystemExit(f"no metrics.jsonl in {', '.join(missing)}: pass train_gsm8k.py --out folders")
        print(summary_tables([Path(run) for run in args.runs]))
        return
    if not args.model:
        parser.error("--model is required (its tokenizer reads the trees)")
    missing = [run for run in args.runs if trees_file(Path(run)) is None]
    if missing:
        raise SystemExit(f"no trees.jsonl in {', '.join(missing)}: run train_gsm8k.py with --save-trees")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.show:
        print(show_trees(Path(args.runs[0]), tokenizer, args.show))
        return
    methods = {}
    for run in map(Path, args.runs):
        methods.setdefault(method_of(run), []).append(run)
    for method, runs in methods.items():  # the seeds of a method pooled
        title = f"{method} ({', '.join(run.name for run in runs)}), credit: {args.credit}"
        shares = ", ".join(f"{run.name} {trained_share(run, args.credit):.0%}" for run in runs)
        print(markdown(title, credit_table(runs, tokenizer, args.segment_tokens, args.credit)) +
              f"\nsampled tokens trained: {shares}\n")


if __name__ == "__main__":
    main()
