"""The demo's default step at its real size, on a CPU: each phase's peak memory and seconds, and
the anatomy of the step's trees.

The model: a real 0.5B, Qwen2.5-Coder-0.5B-Instruct dequantized (`offline/qwen05.py`), on real
GSM8K questions scored by the demo's reward; or Qwen2.5-0.5B's architecture with random weights
(`offline/qwen_shape.py`) with `--coin-rewards`: random weights never answer right nor stop, so
each leaf gets a seeded coin flip instead and the loss runs as in a real step. The step is
train_gsm8k.py's own `train_step` with every flag at the demo's default (N=4, D=2, L=192,
temperature 0.6, the strict reward, the KL reference, AdamW, packed rows of at most
--max-row-tokens) except the questions in the step (--prompts, the first of the demo's shuffled
training questions), --dtype and the device. Before it, the evaluation of --eval-size test
questions. It prints each phase's peak resident memory and seconds, the trees' anatomy, then one
JSON line.

    python -m offline.qwen05 out/qwen05
    python -m bench.rehearse out/qwen05 --data GSM8K_FOLDER --prompts 8 --dtype bf16   # ~30 min, 2 threads
    python -m bench.rehearse out/qwen-shape --coin-rewards                             # random weights, fp32

Run it alone: it needs most of a 24 GB machine. --stop-above GB ends it (exit 3) when the process
grows past that, before the kernel's out-of-memory killer picks a process of its own choosing.
"""

import argparse
import json
import random
import sys
from collections import Counter

import torch

import train_gsm8k
from demo import evaluation
from bench.bench import PeakMemory, rss_bytes
from reward import SMOKE_PROBLEMS, load_problems
from treerpo import leaves, nodes


def measured(name: str, function, figures: dict, stop_above: float):
    """`function`, its peak resident memory and seconds recorded in figures[name] at each call."""
    def wrapper(*args, **kwargs):
        with PeakMemory("cpu", stop_above, name) as memory:
            result = function(*args, **kwargs)
        figures[name] = {"peak_gb": round(memory.peak_bytes / 2**30, 2), "seconds": round(memory.seconds, 1)}
        print(f"{name:16} peak {memory.peak_bytes / 2**30:6.2f} GB resident  {memory.seconds:7.1f} s", flush=True)
        return result
    return wrapper


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
    parser.add_argument("--first-step", dest="steady", action="store_false",
                        help="measure the first step (no AdamW moments yet, the weights still the file's pages) "
                             "instead of a later one")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    flags = ["--model", args.model, "--data", args.data, "--device", "cpu", "--dtype", args.dtype, "--out", "unused",
             "--prompts-per-step", str(args.prompts), "--sample-batch-size", str(args.prompts)]
    for name in ("max_row_tokens", "branch", "depth", "segment_tokens"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))] if getattr(args, name) else []
    cfg, _ = train_gsm8k.parse_args(flags)
    stop_above, figures = args.stop_above * 2**30, {}
    for name, module, function in (("evaluation", evaluation, "evaluate"), ("sampling", train_gsm8k, "sample_and_score"),
                                   ("loss", train_gsm8k, "backward_loss")):
        setattr(module, function, measured(name, getattr(module, function), figures, stop_above))
    train_problems = SMOKE_PROBLEMS if args.data == "smoke" else load_problems(args.data, "train")
    random.Random(cfg.seed).shuffle(train_problems)  # the demo's order: its first step's questions
    test_problems = SMOKE_PROBLEMS if args.data == "smoke" else load_problems(args.data, "test")

    with PeakMemory("cpu", stop_above, "loading") as memory:
        model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
        reference = train_gsm8k.reference_model(cfg, model, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    figures["loading"] = {"peak_gb": round(memory.peak_bytes / 2**30, 2), "seconds": round(memory.seconds, 1)}
    print(f"loading          peak {memory.peak_bytes / 2**30:6.2f} GB resident  (policy, KL reference, AdamW)", flush=True)
    if args.steady:  # the step as from the second on: AdamW's moments exist, the policy's weights are its own
        with torch.no_grad():  # (loaded weights are pages of the model file, shared with the reference's,
            for parameter in model.parameters():  # until an update writes them)
                parameter.copy_(parameter.clone())
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # zero gradients: the moments are allocated, the weights do not move
        optimizer.zero_grad(set_to_none=True)
        print(f"steady state     {rss_bytes() / 2**30:6.2f} GB resident  (AdamW's moments, the policy's own pages)")
    optimizer.step = measured("optimizer step", optimizer.step, figures, stop_above)
    torch.manual_seed(0)
    scores = evaluation.evaluate(model, tokenizer, test_problems[:args.eval_size], cfg, "cpu")
    if args.coin_rewards:  # for the step's leaves (the evaluation above is scored for real)
        coin = random.Random(0)
        train_gsm8k.gsm8k_reward = lambda text, answer, strict=False: float(coin.random() < 0.5)
    record, roots = train_gsm8k.train_step(model, reference, tokenizer, optimizer, train_problems[:args.prompts], cfg,
                                           "cpu")
    shape = {key: record[key] for key in ("leaves", "segments", "tokens_generated", "tokens", "forwards", "positions",
                                          "kept_nodes", "pruned_nodes", "skipped")}
    trees = anatomy(roots, record)
    print(json.dumps({"anatomy": trees}))
    result = {"config": {"model": args.model, "dtype": args.dtype, "max_row_tokens": cfg.max_row_tokens,
                         "tree": [cfg.branch, cfg.depth, cfg.segment_tokens], "prompts": args.prompts, "steady": args.steady, "coin_rewards": args.coin_rewards,
                         "threads": torch.get_num_threads(), "torch": torch.__version__},
              "phases": figures, "step": shape, "anatomy": trees, "evaluation": scores,
              "peak_gb": max(f["peak_gb"] for f in figures.values())}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
