"""The demo's held-out evaluation: greedy Pass@1 on test questions, strict and lenient, before training,
every --eval-every steps and at the end (used by train_gsm8k.py). Greedy answers are a tree of one
branch and one level, cut at the training answers' length, D x L tokens."""

import time

from tqdm import tqdm

from demo import device as devices, distributed, flags, stops
from reward import chat_prompt, gsm8k_reward
from treerpo import sample_trees


def evaluate_if_due(model, tokenizer, eval_problems, cfg, device: str, step: int, stop) -> dict:
    """The evaluation due after `step` (0, every --eval-every, the last), with its seconds, or {}."""
    if step and not ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
        return {}
    start = time.perf_counter()
    scores = evaluate(model, tokenizer, eval_problems, cfg, device, stop)
    return scores | ({"eval_s": time.perf_counter() - start} if step else {})


def evaluate(model, tokenizer, problems: list[dict], cfg, device: str, stop=None) -> dict:
    """Greedy Pass@1, strict and lenient: a tree of one branch and one level is one greedy answer.
    Each process answers its share of the questions, in as many batches as every other (a stop is
    checked between them, by all at once, and at every token); the scores are summed."""
    strict = lenient = length = truncated = 0
    rank, world = distributed.rank_and_world()
    mine = distributed.share(problems, rank, world)
    for start in tqdm(range(0, -(-len(problems) // world), cfg.eval_batch_size), desc="evaluating", leave=False):
        if stop is not None and distributed.anyone(stop.requested, device):
            raise stops.Dropped
        batch = mine[start:start + cfg.eval_batch_size]
        if not batch:  # this process's share ended a batch early: it still checks for a stop with the others
            continue
        prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in batch]
        with devices.phase("evaluation"), devices.autocast(device, cfg.dtype):
            try:
                roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1, do_sample=False,
                                     segment_tokens=flags.answer_tokens(cfg),
                                     should_stop=stop.should_stop if stop else None)
            except ValueError as error:  # a guard of treerpo.py's, already one line
                raise SystemExit(f"evaluation refused: {error}")
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)  # decoded once, scored twice
            strict += gsm8k_reward(text, problem["answer"], strict=True)
            lenient += gsm8k_reward(text, problem["answer"], strict=False)
            length, truncated = length + len(answer.tokens), truncated + (not answer.finished)  # cut at D x L
    sums = distributed.sum_numbers({"strict": strict, "lenient": lenient, "length": length, "cut": truncated}, device)
    n = len(problems)
    return {"eval_strict": sums["strict"] / n, "eval_lenient": sums["lenient"] / n,
            "eval_response_tokens": sums["length"] / n, "eval_truncated": sums["cut"] / n, "eval_questions": n}
