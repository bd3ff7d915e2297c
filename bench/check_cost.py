"""What treerpo.py's model checks cost on a real model: `check_branchable` (run by every sample_trees
call) against that call, and `can_pack` with `plain_output_head` (run by every backward_loss call)
against that call, on the same trees, in the demo's precision on this machine (each call's time
includes its checks).

    python -m bench.check_cost out/qwen05 --data GSM8K_FOLDER --questions 2

The trees: --questions of the demo's first training questions, its prompt and default tree (N=4, D=2,
L=192, temperature 0.6), rewarded by the strict reward. Each figure is the median of --repeats.
"""

import argparse
import json
import random
import statistics
import time

import torch

from demo import models
from reward import chat_prompt, gsm8k_reward, load_problems
from treerpo import (assign_advantages, backward_loss, can_pack, check_branchable, generate_settings, leaves, nodes,
                     plain_output_head, response_tokens, sample_trees, special_ids)


def seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default="smoke")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problems = load_problems(args.data, "train")
    random.Random(0).shuffle(problems)
    problems = problems[:args.questions]
    prompts = [chat_prompt(tokenizer, problem["question"], "demo") for problem in problems]
    bf16 = models.bf16("cpu", "auto")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(0)
        start = time.perf_counter()
        roots = sample_trees(model, tokenizer, prompts, branch=4, depth=2, segment_tokens=192, temperature=0.6)
        sampling = time.perf_counter() - start
        for root, problem in zip(roots, problems):
            for leaf in leaves(root):
                leaf.reward = gsm8k_reward(tokenizer.decode(response_tokens(leaf), skip_special_tokens=True),
                                           problem["answer"], strict=True)
            assign_advantages(root, tau=0.0)  # every group kept: the loss has the most to do
        pad_id, eos_ids = special_ids(model, tokenizer)
        generation = generate_settings(model, pad_id, eos_ids, 0.6, 1.0, True)
        branch_check = seconds(lambda: check_branchable(model, roots[0].tokens, generation, eos_ids), args.repeats)
        loss_checks = seconds(lambda: (can_pack([model], roots, None, "cpu"),
                                       plain_output_head(model, roots, "cpu")), args.repeats)
        loss = seconds(lambda: backward_loss(model, roots, temperature=0.6, max_row_tokens=2048), 1)
    figures = {"model": args.model, "bf16": bf16, "threads": torch.get_num_threads(), "questions": args.questions,
               "tokens_sampled": sum(len(node.tokens) for root in roots for node in nodes(root)[1:]),
               "sampling_s": round(sampling, 1), "check_branchable_s": round(branch_check, 2),
               "loss_s": round(loss, 1), "can_pack_and_head_s": round(loss_checks, 2),
               "branch_check_over_sampling": round(branch_check / sampling, 4),
               "loss_checks_over_loss": round(loss_checks / loss, 4)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
