"""The demo's default step at its real size, on a CPU: each phase's peak memory and seconds, and
the anatomy of the step's trees.

The model: a real 0.5B, Qwen2.5-Coder-0.5B-Instruct dequantized (`offline/qwen05.py`), on real
GSM8K questions scored by the demo's reward; or Qwen2.5-0.5B's architecture with random weights
(`offline/qwen_shape.py`) with `--coin-rewards`: random weights never answer right nor stop, so
each leaf gets a seeded coin flip instead and the loss runs as in a real step. The steps are
train_gsm8k.py's own loop with every flag at the demo's default (N=4, D=2, L=192, temperature 0.6,
the strict reward, the KL reference, AdamW, packed rows of at most --max-row-tokens) except the
questions a step (--prompts), --dtype and the device: two steps, the second measured (AdamW's moments
exist by then), and the evaluation of --eval-size test questions after it. It prints each phase's
peak resident memory and seconds, the second step's trees' anatomy, then one JSON line.

    python -m offline.qwen05 out/qwen05
    python -m bench.rehearse out/qwen05 --data GSM8K_FOLDER --prompts 8 --dtype bf16   # ~30 min, 2 threads
    python -m bench.rehearse out/qwen-shape --coin-rewards                             # random weights, fp32

Run it alone: it needs most of a 24 GB machine. --stop-above GB ends it (exit 3) when the process
grows past that, before the kernel's out-of-memory killer picks a process of its own choosing.
"""

import argparse
import json
import sys
from collections import Counter

import torch

from bench.bench import PeakMemory
from bench.demo_steps import run_steps
from probes.credit import rebuild
from treerpo import leaves, nodes


def anatomy(roots, record: dict) -> dict:
    """What the step's trees look like: leaves a question, the depth where answers ended, the share
    cut at D x L tokens without EOS, and level by level (the openings are level 1) the sibling
    groups tied, the tokens generated and the tokens the loss trained; openings credited."""
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    generated = [node for root in roots for node in nodes(root)[1:]]
    levels = sorted({node.depth for node in generated})
    groups = {level: [parent.children for root in roots for parent in nodes(root)
                      if parent.children and parent.depth == level - 1] for level in levels}
    openings = [child for root in roots for child in root.children]
    return {
        "questions": len(roots), "leaves_per_question": len(all_leaves) / len(roots),
        "answers_ending_at_depth": dict(sorted(Counter(leaf.depth for leaf in all_leaves if leaf.finished).items())),
        "truncated": sum(not leaf.finished for leaf in all_leaves) / len(all_leaves),
        "tied_groups_by_level": {level: sum(group[0].advantage is None for group in groups[level]) / len(groups[level])
                                 for level in levels},
        "tokens_generated_by_level": {level: sum(len(node.tokens) for node in generated if node.depth == level)
                                      for level in levels},
        "tokens_trained_by_level": {level: sum(len(node.tokens) for node in generated
                                               if node.depth == level and node.advantage is not None) for level in levels},
        "openings_credited": sum(node.advantage is not None for node in openings) / len(openings),
        "questions_with_a_right_leaf": record["solve_rate"], "reward": record["reward"],
        "tokens_generated": record["tokens_generated"], "tokens_trained": record["tokens"],
        "answer_tokens": record["response_tokens"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model folder (offline/qwen05.py, or offline/qwen_shape.py's random weights)")
    parser.add_argument("--data", default="smoke", help="--data of the demo: a GSM8K folder, or smoke (the default)")
    parser.add_argument("--prompts", type=int, default=1, help="questions in the step (default: %(default)s)")
    parser.add_argument("--eval-size", type=int, default=8, help="held-out questions evaluated (default: %(default)s)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the demo's --dtype (default: fp32)")
    for flag in ("--max-row-tokens", "--branch", "--depth", "--segment-tokens"):
        parser.add_argument(flag, type=int, default=None, help="the demo's flag (default: the demo's)")
    parser.add_argument("--coin-rewards", action="store_true", help="a seeded coin flip for a reward (random weights)")
    parser.add_argument("--stop-above", type=float, default=21.0, help="GB resident (default: %(default)s)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    flags = ["--model", args.model, "--data", args.data, "--device", "cpu", "--dtype", args.dtype, "--steps", "2",
             "--eval-every", "0", "--eval-size", str(args.eval_size), "--prompts-per-step", str(args.prompts),
             "--sample-batch-size", str(args.prompts), "--save-trees"]
    for name in ("max_row_tokens", "branch", "depth", "segment_tokens"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))] if getattr(args, name) else []
    stop_above = args.stop_above * 2**30

    def measured(name, function, figures):
        """`function`, its peak resident memory and seconds recorded in figures[name] at each call."""
        def wrapper(*arguments, **kwargs):
            with PeakMemory("cpu", stop_above, name) as memory:
                result = function(*arguments, **kwargs)
            figures[name] = {"peak_gb": round(memory.peak_bytes / 2**30, 2), "seconds": round(memory.seconds, 1)}
            print(f"{name:16} peak {memory.peak_bytes / 2**30:6.2f} GB resident  {memory.seconds:7.1f} s", flush=True)
            return result
        return wrapper
    records, figures, trees = run_steps(flags, measured, coin_rewards=args.coin_rewards, trees=True)
    record = records[2]
    shape = {key: record[key] for key in ("leaves", "segments", "tokens_generated", "tokens", "forwards", "positions",
                                          "kept_nodes", "pruned_nodes", "skipped")}
    anatomy_of_step = anatomy([rebuild(tree) for tree in trees[1]["trees"]], record)
    print(json.dumps({"anatomy": anatomy_of_step}))
    result = {"config": {"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "flags": flags,
                         "coin_rewards": args.coin_rewards, "threads": torch.get_num_threads(),
                         "torch": torch.__version__},
              "phases": figures, "step": shape, "anatomy": anatomy_of_step,
              "evaluation": {key: value for key, value in record.items() if key.startswith("eval_")},
              "peak_gb": max(f["peak_gb"] for f in figures.values())}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
