"""The peer check: TRL's GRPOTrainer on exactly the work of `train_gsm8k.py --method grpo`.

TRL (https://github.com/huggingface/trl) is the GRPO most people use. This script runs its
GRPOTrainer with the settings of the README's CPU recipe for GRPO with 8 answers, and writes a
metrics.jsonl like train_gsm8k.py's (held-out accuracy by this repository's own evaluation, seconds
per step), so the two can be compared run by run and plotted together with `python -m pictures.plots`.

    pip install trl==1.16.0                                   # optional: only this script needs it
    python -m bench.bench_trl --model out/smollm2 --seed 0 --out out/peer/trl-s0
    python -m bench.bench_trl --model out/smollm2 --check          # the same answers: same loss and gradient?

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

from reward import SYSTEM_PROMPTS, chat_prompt, gsm8k_reward, word_problems
from demo import records
from demo.evaluation import evaluate
from train_gsm8k import Config
from treerpo import assign_advantages, backward_loss, leaves, pad_rows, sample_trees

STEPS, PROMPTS_PER_STEP, ANSWERS, SEGMENT_TOKENS, DEPTH = 20, 8, 8, 16, 3  # the recipe: answers of 3 x 16 tokens


def recipe_order(seed: int) -> list[dict]:
    """The train problems in the order train_gsm8k.py's run with this seed takes them."""
    import random
    problems = word_problems("easy", "train")
    random.Random(seed).shuffle(problems)
    return problems[:STEPS * PROMPTS_PER_STEP]


def trl_config(trl, **kwargs):
    """TRL's GRPOConfig with the recipe's GRPO settings (the script's runs and --check share them)."""
    settings = dict(use_cpu=True, report_to="none", num_generations=ANSWERS, max_completion_length=DEPTH * SEGMENT_TOKENS,
                    temperature=0.7, top_p=1.0, top_k=0, learning_rate=1e-5, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                    scale_rewards="group", num_iterations=1, epsilon=0.2, gradient_checkpointing=False, bf16=False)
    return trl.GRPOConfig(**(settings | kwargs))


def check(trl, model_dir: str) -> dict:
    """One step's 64 answers (8 recipe questions, seed 0), sampled by `sample_trees`; the loss and
    gradient of `backward_loss` (with --tau 0, TRL's token count) against TRL's `_compute_loss` on
    the same answers, in 16-answer micro-batches like the runs; then the same questions sampled
    TRL's way (each prompt 8 times in one `generate`, its GenerationConfig) from the same seed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = recipe_order(0)[:PROMPTS_PER_STEP]
    prompts = [chat_prompt(tokenizer, problem["question"], "brief") for problem in problems]
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, prompts, branch=ANSWERS, depth=1, segment_tokens=DEPTH * SEGMENT_TOKENS,
                         temperature=0.7)
    for root, problem in zip(roots, problems):
        for leaf in leaves(root):
            leaf.reward = gsm8k_reward(tokenizer.decode(leaf.tokens, skip_special_tokens=True), problem["answer"])
        assign_advantages(root, tau=0.0)
    model.train()
    loss, stats = backward_loss(model, roots, temperature=0.7)
    ours = torch.cat([parameter.grad.flatten() for parameter in model.parameters()]).double()
    model.zero_grad(set_to_none=True)

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": problem["question"]}]} for problem in problems])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts),
                              args=trl_config(trl, output_dir="/tmp/bench_trl_check", per_device_train_batch_size=64,
                                              gradient_accumulation_steps=1, steps_per_generation=1),
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which is not run here
    answers = [(root.tokens, child) for root in roots for child in root.children]
    prompt_ids, prompt_mask = pad_rows([prompt for prompt, _ in answers], tokenizer.pad_token_id, side="left")
    completion_ids, completion_mask = pad_rows([child.tokens for _, child in answers], tokenizer.pad_token_id, side="right")
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([child.advantage for _, child in answers]),
              "num_items_in_batch": completion_mask.sum(), "old_per_token_logps": None, "ref_per_token_logps": None}
    trl_loss = 0.0
    for start in range(0, len(answers), 16):
        part = trainer._compute_loss(model, {key: value[start:start + 16] if torch.is_tensor(value) and value.dim()
                                             else value for key, value in inputs.items()})
        part.backward()
        trl_loss += part.item()
    theirs = torch.cat([parameter.grad.flatten() for parameter in model.parameters()]).double()
    figures = {"loss": loss, "trl_loss": trl_loss, "grad_norm": ours.norm().item(), "trl_grad_norm": theirs.norm().item(),
               "relative_difference": ((ours - theirs).norm() / ours.norm()).item(), "answers": len(answers),
               "tokens": stats["tokens"], "trl_tokens": int(completion_mask.sum())}

    generation = GenerationConfig(max_new_tokens=DEPTH * SEGMENT_TOKENS, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=[tokenizer.eos_token_id], temperature=0.7, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0)  # TRL's generation settings
    repeated = [root.tokens for root in roots for _ in range(ANSWERS)]
    input_ids, attention_mask = pad_rows(repeated, tokenizer.pad_token_id, side="left")
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = model.eval().generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
    drawn = drawn[:, input_ids.shape[1]:].tolist()
    figures["same_answers"] = sum(row[:len(child.tokens)] == child.tokens for row, (_, child) in zip(drawn, answers))
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder, e.g. out/smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the run's folder (required unless --check)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--check", action="store_true", help="instead: compare the loss, gradient and samples on one step")
    args = parser.parse_args()
    try:
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    except ImportError:
        raise SystemExit("bench/bench_trl.py needs TRL, an optional dependency: pip install trl==1.16.0")
    if args.check:
        figures = check(trl, args.model)
        print(f"same {figures['answers']} answers: loss {figures['loss']:.6f} here, {figures['trl_loss']:.6f} TRL; "
              f"gradient norm {figures['grad_norm']:.6f} here, {figures['trl_grad_norm']:.6f} TRL, relative difference "
              f"{figures['relative_difference']:.1e}; tokens {figures['tokens']} here, {figures['trl_tokens']} TRL. Sampled TRL's way from the same seed: {figures['same_answers']} of "
              f"{figures['answers']} answers identical to sample_trees'")
        return
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    if (out / "metrics.jsonl").exists():
        raise SystemExit(f"{out / 'metrics.jsonl'} exists: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"method": f"TRL GRPOTrainer G={ANSWERS}", "seed": args.seed}))

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

    config = trl_config(trl, output_dir=str(out / "trl"), seed=args.seed, max_steps=args.steps, logging_steps=1,
                        save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0,
                        per_device_train_batch_size=16, gradient_accumulation_steps=4)  # 64 answers: 8 questions a step

    (out / "metrics.jsonl").write_text("")
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
            records.append(out / "metrics.jsonl", record)

    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Record()])
    model.generate = timed_generate
    trainer.train()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [record for record in logged if "eval_lenient" in record]
    print(f"done: TRL {trl.__version__} GRPO, seed {args.seed}, {args.steps} steps; held-out lenient "
          + " -> ".join(f"{record['eval_lenient']:.0%}" for record in evaluated) + f"; metrics in {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
