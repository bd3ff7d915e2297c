"""bf16 autocast against fp32 on a CPU: the demo's step, phase by phase, alternated in one process.

    OMP_NUM_THREADS=1 python -m bench.precision out/smollm2
    OMP_NUM_THREADS=1 python -m bench.precision out/qwen05 --segment-tokens 64

The weights and AdamW stay fp32 in both (as `--dtype bf16` keeps them); only the compute differs.
Each repeat runs fp32 then bf16 (then bf16 then fp32 on the next, so that neither always goes
first), on the same work:
    sampling   one tree a question (GSM8K training questions, the demo's prompt), the same seed
    loss       backward_loss on the same scored trees (fp32's first samples, rewards alternating
               0/1 so that every group is kept), packed rows, no KL reference
    adamw      one AdamW step (fp32 in both: autocast does not touch it)
Segments cut at L tokens unless an answer ends: a short L keeps the tokens equal in both, so the
sampling ratio compares the same work (the tokens are printed). The last line is one JSON object.
"""

import argparse
import json
import statistics
import time

import torch

from bench.bench import PROMPTS
from reward import chat_prompt
from treerpo import assign_advantages, backward_loss, leaves, nodes, sample_trees

PRECISIONS = ("fp32", "bf16")


def timed(function, precision: str):
    """(seconds, result) of `function()` under `precision`'s autocast on the CPU."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        result = function()
    return time.perf_counter() - start, result


def scored(roots):
    """Rewards alternating by leaf, so that every group is kept (tau 0); returns the roots."""
    for root in roots:
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)
        assign_advantages(root, tau=0.0)
    return roots


def bench(model, tokenizer, questions, *, branch, depth, segment_tokens, repeats) -> dict:
    prompts = [chat_prompt(tokenizer, question) for question in questions]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay as loaded

    def sample():
        torch.manual_seed(0)
        return sample_trees(model, tokenizer, prompts, branch=branch, depth=depth, segment_tokens=segment_tokens,
                            temperature=0.6)

    trees = scored(sample())  # warm-up, and the loss's trees
    model.train()
    backward_loss(model, trees)
    optimizer.step()  # warm-up: AdamW allocates its moments at its first step
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    seconds = {precision: {"sampling": [], "loss": [], "adamw": []} for precision in PRECISIONS}
    tokens = {precision: [] for precision in PRECISIONS}
    for repeat in range(repeats):
        for precision in PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]:
            took, roots = timed(sample, precision)
            seconds[precision]["sampling"].append(took)
            tokens[precision].append(sum(len(node.tokens) for root in roots for node in nodes(root)[1:]))
            model.train()
            took, _ = timed(lambda: backward_loss(model, trees), precision)
            seconds[precision]["loss"].append(took)
            took, _ = timed(optimizer.step, precision)
            seconds[precision]["adamw"].append(took)
            optimizer.zero_grad(set_to_none=True)
            model.eval()
    figures = {precision: {phase: statistics.median(values) for phase, values in phases.items()}
               for precision, phases in seconds.items()}
    for precision in PRECISIONS:
        figures[precision]["step"] = sum(figures[precision].values())
        figures[precision]["tokens_sampled"] = tokens[precision]
    figures["bf16_over_fp32"] = {phase: figures["bf16"][phase] / figures["fp32"][phase]
                                 for phase in ("sampling", "loss", "adamw", "step")}
    figures["seconds"] = seconds
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (offline/smollm2.py, offline/qwen05.py)")
    parser.add_argument("--questions", type=int, default=2, help="trees a step, at most 4 (default: %(default)s)")
    parser.add_argument("--branch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="of each precision, alternated (default: %(default)s)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    questions = PROMPTS[:args.questions]
    figures = bench(model, tokenizer, questions, branch=args.branch, depth=args.depth,
                    segment_tokens=args.segment_tokens, repeats=args.repeats)
    for precision in PRECISIONS:
        numbers = figures[precision]
        print(f"{precision}: sampling {numbers['sampling']:7.1f} s ({numbers['tokens_sampled']} tokens)  loss "
              f"{numbers['loss']:7.1f} s  AdamW {numbers['adamw']:5.1f} s  step {numbers['step']:7.1f} s", flush=True)
    ratios = figures["bf16_over_fp32"]
    print("bf16 / fp32: " + ", ".join(f"{phase} {ratio:.2f}x" for phase, ratio in ratios.items()))
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      **{key: value for key, value in vars(args).items() if key != "model"}, **figures}))


if __name__ == "__main__":
    main()
