"""Held-out greedy Pass@1, strict and lenient: a tree of one branch and one level is one greedy answer,
cut at the training answers' budget. Each process answers its share; the scores are summed."""

from demo import distributed, models
from reward import chat_prompt, gsm8k_reward
from treerpo import sample_trees


def evaluate(model, tokenizer, problems: list[dict], cfg, device: str) -> dict:
    strict = lenient = length = cut = 0
    mine = distributed.share(problems)
    for start in range(0, len(mine), cfg.eval_batch_size):
        batch = mine[start:start + cfg.eval_batch_size]
        prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in batch]
        with models.autocast(device, cfg.dtype):
            roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1, do_sample=False,
                                 segment_tokens=cfg.answer_tokens())
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
            strict += gsm8k_reward(text, problem["answer"], strict=True)
            lenient += gsm8k_reward(text, problem["answer"], strict=False)
            length, cut = length + len(answer.tokens), cut + (not answer.finished)
    sums = distributed.sum_numbers({"eval_strict": strict, "eval_lenient": lenient, "eval_response_tokens": length,
                                    "eval_truncated": cut}, device)
    return {key: total / len(problems) for key, total in sums.items()} | {"eval_questions": len(problems)}
