"""The peer check: TRL's GRPOTrainer on exactly the work of `train_gsm8k.py --method grpo`.

TRL (https://github.com/huggingface/trl) is the GRPO most people use. This script runs its
GRPOTrainer with the settings of the README's CPU recipe for GRPO with 8 answers, and writes a
metrics.jsonl like train_gsm8k.py's (held-out accuracy by this repository's own evaluation, seconds
per step), so the two can be compared run by run and plotted together with `train_gsm8k.py --plot`.

    pip install trl==1.16.0                                   # optional: only this script needs it
    python bench_trl.py --model out/smollm2 --seed 0 --out out/peer/trl-s0

Held equal with `train_gsm8k.py --method grpo --width 8` and the recipe's flags: the model folder,
the `--data easy` train problems in the script's order (8 a step), the brief system prompt, 8
answers of at most 48 tokens at temperature 0.7 with no top-k or top-p, AdamW at lr 1e-5 constant,
no KL, grad clip 1.0, one optimizer step per 8 questions, group-std-scaled rewards, the loss
averaged over the batch's tokens (TRL's loss_type="dapo"), the lenient reward, and the evaluation:
greedy, the first 100 easy test questions, every 5 steps. Not equal: TRL forwards each answer with
its own copy of the prompt (here the packed loss forwards the prompt once), and it keeps groups
whose answers all scored the same in the loss's token count (advantage 0), where train_gsm8k.py
drops groups whose rewards span less than --tau 0.1; `--tau 0` there counts them as TRL does.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from reward import SYSTEM_PROMPTS, gsm8k_reward, word_problems
from run_folder import json_record
from train_gsm8k import Config, evaluate

STEPS, PROMPTS_PER_STEP, ANSWERS, SEGMENT_TOKENS, DEPTH = 20, 8, 8, 16, 3  # the recipe: answers of 3 x 16 tokens


def recipe_order(seed: int) -> list[dict]:
    """The train problems in the order train_gsm8k.py's run with this seed takes them."""
    import random
    problems = word_problems("easy", "train")
    random.Random(seed).shuffle(problems)
    return problems[:STEPS * PROMPTS_PER_STEP]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder, e.g. out/smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    try:
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    except ImportError:
        raise SystemExit("bench_trl.py needs TRL, an optional dependency: pip install trl==1.16.0")
    out = Path(args.out)
    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out / 'metrics.jsonl'} exists: pass another --out")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    problems = recipe_order(args.seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM_PROMPTS["brief"]},
                                             {"role": "user", "content": problem["question"]}],
                                  "answer": problem["answer"]} for problem in problems])
    evaluation = Config(model=args.model, data="easy", depth=DEPTH, segment_tokens=SEGMENT_TOKENS, eval_size=100,
                        eval_batch_size=50, system_prompt="brief")
    eval_problems = word_problems("easy", "test")[:evaluation.eval_size]
    seen = []  # the questions of each step, as the reward function sees them

    def reward(prompts, completions, answer, **kwargs):
        seen.append(sorted(set(prompt[-1]["content"] for prompt in prompts)))
        return [gsm8k_reward(completion[0]["content"], reference) for completion, reference in zip(completions, answer)]

    config = trl.GRPOConfig(
        output_dir=str(out / "trl"), seed=args.seed, max_steps=args.steps, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0,
        num_generations=ANSWERS, max_completion_length=DEPTH * SEGMENT_TOKENS, temperature=0.7, top_p=1.0, top_k=0,
        per_device_train_batch_size=16, gradient_accumulation_steps=4,  # 64 answers = 8 questions an optimizer step
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1, epsilon=0.2,
        gradient_checkpointing=False, bf16=False)

    metrics = open(out / "metrics.jsonl", "w")
    generate_seconds = [0.0]
    plain_generate = model.generate

    def timed_generate(*args, **kwargs):  # TRL's sampling, timed apart from the loss
        start = time.perf_counter()
        try:
            return plain_generate(*args, **kwargs)
        finally:
            generate_seconds[0] += time.perf_counter() - start

    class Record(TrainerCallback):
        """Per step: TRL's own figures, seconds, and every 5 steps this repository's evaluation."""

        def on_train_begin(self, *_, **__):
            self.log({"step": 0, **evaluate(model, tokenizer, eval_problems, evaluation, "cpu")})

        def on_step_begin(self, *_, **__):
            self.start, generate_seconds[0] = time.perf_counter(), 0.0

        def on_step_end(self, *_, **__):
            self.step_s = time.perf_counter() - self.start

        def on_log(self, _args, state, _control, logs=None, **__):
            if "reward" not in (logs or {}):
                return
            step = state.global_step
            expected = sorted(set(problem["question"] for problem in problems[(step - 1) * 8:step * 8]))
            if seen[-1] != expected:
                raise SystemExit(f"step {step}: TRL trained on other questions than train_gsm8k.py would")
            record = {"step": step, "reward": logs["reward"], "response_tokens": logs.get("completions/mean_length"),
                      "truncated": logs.get("completions/clipped_ratio"), "loss": logs.get("loss"),
                      "grad_norm": logs.get("grad_norm"), "frac_reward_zero_std": logs.get("frac_reward_zero_std"),
                      "tokens_generated": round(logs.get("completions/mean_length", 0) * ANSWERS * PROMPTS_PER_STEP),
                      "sample_s": generate_seconds[0],
                      "loss_and_update_s": self.step_s - generate_seconds[0]}
            if step % 5 == 0 or step == args.steps:
                start = time.perf_counter()
                record |= evaluate(model, tokenizer, eval_problems, evaluation, "cpu")
                record["eval_s"] = time.perf_counter() - start
            self.log(record)

        def log(self, record):
            metrics.write(json_record(record) + "\n")
            metrics.flush()

    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Record()])
    model.generate = timed_generate
    trainer.train()
    metrics.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [record for record in records if "eval_lenient" in record]
    print(f"done: TRL {trl.__version__} GRPO, seed {args.seed}, {args.steps} steps; held-out lenient "
          + " -> ".join(f"{record['eval_lenient']:.0%}" for record in evaluated) + f"; metrics in {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
