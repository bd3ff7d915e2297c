"""The output head in fp32 against bf16 under bf16 autocast: the cost, and the log-prob error it removes.

    OMP_NUM_THREADS=2 python -m bench.head_precision out/qwen05 --data GSM8K_FOLDER

Under bf16 autocast `treerpo.token_logprobs` runs the head as the model's forward does, in bf16 (as
sampling does too); the alternative would compute the head's logits in fp32. On the same rows
(--questions GSM8K training questions, each followed by its reference solution, the solutions'
tokens scored) it alternates, --repeats times:
    fp32        no autocast: the log-probs both bf16 variants are compared against
    head_bf16   bf16 autocast, the head in bf16 as autocast runs it (treerpo.py)
    head_fp32   bf16 autocast, the head alone in fp32
and times one forward and backward of the scored log-probs under each bf16 variant. The last line is
one JSON object.
"""

import argparse
import json
import statistics
import time

import torch

import treerpo
from reward import SMOKE_PROBLEMS, chat_prompt, load_problems


def rows(tokenizer, problems):
    """input_ids, attention_mask (rows, T) right-padded, and the (rows, T) mask of scored tokens."""
    prompts = [tokenizer(chat_prompt(tokenizer, p["question"]), add_special_tokens=False).input_ids for p in problems]
    answers = [tokenizer(p["answer"], add_special_tokens=False).input_ids for p in problems]
    input_ids, attention_mask = treerpo.pad_rows([a + b for a, b in zip(prompts, answers)], pad_id=0, side="right")
    scored = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        scored[row, len(prompt):len(prompt) + len(answer)] = True
    return input_ids, attention_mask, scored


def logprobs_and_seconds(model, inputs, scored, variant: str):
    """(the scored tokens' log-probs (n,), seconds of forward + backward) under `variant`."""
    input_ids, attention_mask = inputs
    columns = scored.any(0).nonzero().squeeze(1)
    head = model.get_output_embeddings()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "fp32"):
        with treerpo.hidden_states_out(model, head):
            hidden = model(input_ids, attention_mask=attention_mask, position_ids=treerpo.position_ids(attention_mask),
                           logits_to_keep=columns - 1).logits  # (rows, K, H)
        with torch.autocast("cpu", enabled=variant == "head_bf16"):  # else the head in fp32, autocast off
            logits = head(hidden.float() if variant == "head_fp32" else hidden)  # (rows, K, V)
        logprobs = treerpo.target_logprobs(logits, input_ids[:, columns], 1.0)  # (rows, K)
        picked = logprobs[scored[:, columns]]
    picked.sum().backward()
    return picked.detach().float(), time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (offline/qwen05.py, offline/smollm2.py)")
    parser.add_argument("--data", default="smoke", help="a GSM8K folder, or smoke (the built-in problems)")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    problems = (SMOKE_PROBLEMS if args.data == "smoke" else load_problems(args.data, "train"))[:args.questions]
    input_ids, attention_mask, scored = rows(tokenizer, problems)
    truth, _ = logprobs_and_seconds(model, (input_ids, attention_mask), scored, "fp32")
    seconds = {"head_bf16": [], "head_fp32": []}
    errors = {}
    for repeat in range(args.repeats):
        for variant in (("head_bf16", "head_fp32") if repeat % 2 == 0 else ("head_fp32", "head_bf16")):
            logprobs, spent = logprobs_and_seconds(model, (input_ids, attention_mask), scored, variant)
            seconds[variant].append(spent)
            errors[variant] = (logprobs - truth).abs()
            print(f"{variant:9} {spent:6.1f} s  |logp - fp32|: mean {errors[variant].mean():.4f}, "
                  f"max {errors[variant].max():.3f}", flush=True)
    result = {"model": args.model, "threads": torch.get_num_threads(), "rows": input_ids.shape[0],
              "tokens": input_ids.numel(), "scored": int(scored.sum()), "repeats": args.repeats,
              **{f"{variant}_s": round(statistics.median(values), 2) for variant, values in seconds.items()},
              "fp32_head_time_ratio": round(statistics.median(seconds["head_fp32"]) / statistics.median(seconds["head_bf16"]), 3),
              **{f"{variant}_abs_error_mean": round(error.mean().item(), 5) for variant, error in errors.items()},
              **{f"{variant}_abs_error_max": round(error.max().item(), 4) for variant, error in errors.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
