"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU.

    python train_gsm8k.py                                     # TreeRPO: branch 4, depth 2, 192-token segments
    python train_gsm8k.py --method grpo --out out/grpo        # GRPO: 8 answers of 2 x 192 tokens, same code path
    python train_gsm8k.py --method treepo --out out/treepo    # TreePO (treepo.py): 8 leaves, dynamic branching
    python train_gsm8k.py --resume                            # go on from the newest checkpoint
    python train_gsm8k.py --smoke                             # every path, offline, on the CPU, in seconds

Each step of the loop (`train`), for --prompts-per-step questions:
    sample     one tree per question (treerpo.sample_trees; GRPO is a tree of one level)
    score      every leaf with the GSM8K reward (reward.py): strict by default, only \\boxed{}/#### count
    credit     node values and sibling advantages (treerpo.assign_advantages; TreePO: per leaf)
    loss       PPO-clip on every kept segment, back-propagated (treerpo.backward_loss)
    update     one AdamW step, never with a loss or gradient that is not finite
    evaluate   greedy Pass@1 on held-out questions before, every --eval-every steps and at the end
    save       an atomic checkpoint every --save-every steps (demo/run_folder.py); --resume goes on exactly
It writes <out>/metrics.jsonl, a JSON record per step, and <out>/checkpoint-<step>/. Every knob is a
field of Config and a flag; demo/flags.py checks them all before anything is loaded.
"""

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import treepo
from demo import distributed, flags, gpu, run_folder
from demo.flags import knob
from demo.models import load_model_and_tokenizer, reference_model, trainable
from reward import chat_prompt, gsm8k_reward, load_problems
from treerpo import (NORMS, assign_advantages, backward_loss, counted_tokens, leaves, nodes, response_tokens,
                     reward_of, sample_trees)

METHODS = ("treerpo", "grpo", "treepo")
LOSS_ROWS = {"auto": None, "packed": True, "leaf-paths": False}  # --loss-rows -> backward_loss(packed=...)


@dataclass
class Config:
    model: str = knob("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face model name, a local model folder, or 'tiny' "
                                                    "(a tiny random model, offline)")
    data: str = knob("openai/gsm8k", "hub dataset name; a folder with train.jsonl and test.jsonl; "
                                     "TRAIN.jsonl,TEST.jsonl; 'easy' or 'steps' (generated one- and two-step word "
                                     "problems, reward.py); or 'smoke' (12 built-in problems)")
    out: str = knob("out/treerpo", "the run's folder: metrics.jsonl, checkpoint-<step>/, trees/")
    method: str = knob("treerpo", "treerpo: a full tree; grpo: --width answers of depth * segment-tokens "
                                  "tokens; treepo: treepo.py's budgeted tree of --width leaves", choices=METHODS)
    # the tree: N=4, D=2, L=192 is 20 segments, 16 leaves, at most 3,840 generated tokens per question (~2.1k with
    # real answers); a third level of 128-token segments tied 95% of its groups for half the tokens (docs/cost.md)
    branch: int = knob(4, "treerpo: children per node (N); with --depth 1 this is GRPO's group size", at_least=1)
    depth: int = knob(2, "levels of segments below the prompt (D); a response is at most depth * L tokens", at_least=1)
    segment_tokens: int = knob(192, "tokens per segment (L)", at_least=1)
    width: int = knob(8, "grpo: answers per question (G); treepo: the leaf budget per question (W)", at_least=1)
    divergence: int = knob(2, "treepo: continuations per active path and level, budget permitting", at_least=1)
    temperature: float = knob(0.6, "sampling temperature (the paper's recipe, unchecked: docs/method.md)", above=0)
    system_prompt: str = knob("demo", "the system message before every question: demo, brief or lines "
                                      "(reward.SYSTEM_PROMPTS), or any text")
    # reward, advantages and loss
    reward: str = knob("strict", "strict: only a \\boxed{} or #### answer counts; lenient: the last number counts "
                                 "too (it lets the answer format go: docs/learning.md)", choices=("strict", "lenient"))
    norm: str = knob("std", "advantage normalisation", choices=NORMS)
    tau: float = knob(0.1, "drop sibling groups whose values span less than this", at_least=0)
    clip_eps: float = knob(0.2, "PPO clip range", above=0)
    kl_coef: float = knob(0.001, "k3 KL to the starting model; 0 loads no reference copy", at_least=0)
    # optimisation
    steps: int = knob(200, "optimizer steps", at_least=0)
    prompts_per_step: int = knob(8, "GSM8K questions (trees) per step", at_least=1)
    sample_batch_size: int = knob(8, "prompts per sample_trees call (lower it to save memory)", at_least=1)
    loss_rows: str = knob("auto", "how the loss lays out the trees: packed (each segment once, under a tree mask: "
                                  "needs sdpa or eager attention), leaf-paths (one row per leaf, any attention), "
                                  "or auto (packed where the model allows)", choices=tuple(LOSS_ROWS))
    updates_per_batch: int = knob(1, "optimizer steps on each batch of trees (PPO's mu, TRL's num_iterations); 1: plain "
                                     "policy gradient (ratio 1, nothing clipped); more: the first update's log-probs "
                                     "are the old ones, and the later updates clip the ratio", at_least=1)
    max_row_tokens: int = knob(2048, "packed loss: tokens per row (one forward); bigger trees are split (2048: the "
                                     "0.5B step fits 24 GB, docs/cost.md)", at_least=1)
    micro_batch_size: int = knob(8, "leaf-paths loss: rows per forward/backward", at_least=1)
    lr: float = knob(1e-6, "AdamW learning rate, constant", above=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = knob(1.0, "gradient norm clip", above=0)
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory")
    lora_rank: int = knob(0, "train LoRA adapters of this rank instead of every weight (needs peft); "
                             "the KL reference is then the model with its adapters off. 0: full fine-tuning", at_least=0)
    # evaluation and bookkeeping
    eval_every: int = knob(25, "evaluate every this many steps (0: only before and after)", at_least=0)
    eval_size: int = knob(200, "held-out GSM8K test questions to evaluate on", at_least=1)
    eval_batch_size: int = knob(64, "questions per greedy generate call in evaluation", at_least=1)
    save_every: int = knob(50, "checkpoint every this many steps (and at the end)", at_least=1)
    save_trees: bool = knob(False, "write every step's trees (token ids, rewards, values, advantages) to "
                                   "<out>/trees.jsonl, a line a step, for analyses such as probes/credit.py")
    show_tree_every: int = knob(0, "print the first tree of the step every this many steps, and save it "
                                   "to <out>/trees/step_K.txt (0: never)", at_least=0)
    seed: int = knob(0, "random seed (data order and sampling)")
    device: str = knob("auto", "cuda, cpu, or auto (cuda; the CPU only when asked or with --smoke)")
    dtype: str = knob("auto", "compute precision, the weights and AdamW staying fp32: bf16 (autocast, any device), "
                              "fp32, or auto (bf16 on a GPU, fp32 on a CPU)", choices=gpu.DTYPES)
    resume: bool = knob(False, "continue from the newest checkpoint in --out")
    overwrite: bool = knob(False, "start over in an --out that already holds a run (its files are deleted)")
    smoke: bool = knob(False, "offline CPU run of every path: --model tiny, --data smoke, a small tree, 4 steps, "
                              "into out/smoke, starting over each time (only over a smoke run, unless --resume)")


# --smoke changes these defaults (flags given on the command line still win, --model and --data too).
SMOKE = dict(model="tiny", data="smoke", out="out/smoke", branch=2, depth=2, segment_tokens=8, steps=4,
             prompts_per_step=4, sample_batch_size=2, micro_batch_size=4, lr=3e-3, eval_every=2, eval_size=12,
             eval_batch_size=6, save_every=2, show_tree_every=2, width=4, device="cpu", reward="lenient")


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, argv: list[str] = ()) -> dict | None:
    """The run, from step 0 or from the newest checkpoint (--resume); returns the last record.
    argv: the command line, for the resume command that a stopped run prints. Under torchrun each
    process runs this; process 0 owns the folder (demo/distributed.py)."""
    rank, world, device = distributed.start(gpu.pick_device(cfg.device))
    out, owner = Path(cfg.out), rank == 0
    if owner and gpu.precision_note(device, cfg.dtype):
        print(gpu.precision_note(device, cfg.dtype), file=sys.stderr)
    try:
        with run_folder.opened(out, overwrite=cfg.overwrite, resume=cfg.resume, owner=owner) as checkpoint:
            checkpoint = distributed.gather([checkpoint])[0]  # process 0's, once it holds the folder
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            train_problems = load_problems(cfg.data, "train")  # data first: a bad file fails before the model loads
            random.Random(cfg.seed).shuffle(train_problems)  # one fixed order, so a resumed run sees the next ones
            eval_problems = load_problems(cfg.data, "test")
            if owner and cfg.eval_size > len(eval_problems):
                print(f"note: --eval-size {cfg.eval_size}: the test split has {len(eval_problems)} questions, "
                      "all evaluated", file=sys.stderr)
            eval_problems = eval_problems[:cfg.eval_size]
            model, tokenizer = load_model_and_tokenizer(cfg, checkpoint)  # the same weights in every process
            check_context(model, tokenizer, train_problems + eval_problems, cfg)
            model.to(device)
            optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
            ref_model = reference_model(cfg, model, device)
            if world > 1:  # each process samples its own answers
                torch.manual_seed(cfg.seed * 1000 + rank)
            begin = run_folder.resume_run(checkpoint, optimizer, out, rank) if checkpoint else run_folder.Begin()
            if owner:
                (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))  # what this run is
            return run(model, ref_model, tokenizer, optimizer, train_problems, eval_problems, begin, cfg, device, argv)
    finally:
        distributed.finish()


def check_context(model, tokenizer, problems: list[dict], cfg: Config):
    """Refuse in one line, before any step, answers that cannot fit the model's context after the
    longest prompt of the run (sample_trees would refuse it at the first batch that holds it)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return
    longest = max(len(tokenizer(chat_prompt(tokenizer, problem["question"], cfg.system_prompt),
                                add_special_tokens=False).input_ids) for problem in problems)
    if longest + cfg.depth * cfg.segment_tokens > context:
        raise SystemExit(f"--depth {cfg.depth} x --segment-tokens {cfg.segment_tokens} = "
                         f"{cfg.depth * cfg.segment_tokens} answer tokens after the longest prompt ({longest} tokens) "
                         f"exceed {cfg.model}'s context of {context} tokens: lower --segment-tokens or --depth")


def run(model, ref_model, tokenizer, optimizer, train_problems, eval_problems, begin, cfg, device, argv):
    """The loop from `begin`: a step, then what is due after it (trees shown, an evaluation), its
    record, a checkpoint. A stop drops a step before its update, or an evaluation, which a resumed
    run does again exactly; an update or a save is finished first (run_folder.GracefulStop)."""
    out, started, history, rank, world = Path(cfg.out), time.perf_counter(), [], *distributed.rank_and_world()
    step, records, saved = begin.step, begin.records, begin.checkpoint
    record = begin.pending or ({"step": 0} if step == 0 and records == 0 else None)  # still to evaluate, record
    checkpoint = functools.partial(run_folder.save_step, out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                   cfg=cfg)
    with open(out / "metrics.jsonl" if rank == 0 else os.devnull, "a") as metrics, run_folder.GracefulStop(
            can_drop=world == 1) as stop, tqdm(total=cfg.steps, initial=step, desc="training", disable=rank > 0) as bar:
        while True:
            if record is not None:  # the step's evaluation if due, its record, a checkpoint if due
                rng = run_folder.rng_state()  # what a stop during the evaluation saves
                try:
                    record |= evaluation(model, tokenizer, eval_problems, cfg, device, step, stop)
                except run_folder.Dropped:  # the step is saved with its record pending, evaluated on resume
                    saved = checkpoint(step, rng=rng, records=records, pending=record) if step else None
                    when = f"after step {step} of {cfg.steps}" if step else "before training"
                    run_folder.stopped(stop, f"during the evaluation {when}", saved, argv)
                records = run_folder.append_record(metrics, record | gpu.peak_memory(device), records)
                history += [record] if step else []
                trouble, stopping = run_folder.check_health(history), distributed.anyone(stop.requested, device)
                due = step % cfg.save_every == 0 or step == cfg.steps or (step == begin.step and begin.pending)
                if (step and due) or (stopping and step < cfg.steps) or trouble:
                    saved = checkpoint(step, rng=run_folder.rng_state(), records=records)
                if stopping and step < cfg.steps:
                    run_folder.stopped(stop, f"after step {step} of {cfg.steps}", saved, argv)
                if trouble:
                    raise SystemExit(f"{trouble} The last step's checkpoint is {saved}." if rank == 0 else 1)
            if step == cfg.steps:
                break
            step, rng = step + 1, run_folder.rng_state()  # what a stop before the update saves, as step - 1's
            problems = [train_problems[((step - 1) * cfg.prompts_per_step + i) % len(train_problems)]
                        for i in range(cfg.prompts_per_step)]
            try:
                with stop.droppable():
                    record, roots = train_step(model, ref_model, tokenizer, optimizer, problems, cfg, device, stop)
            except run_folder.Dropped:  # the weights are still step - 1's: saved as such, the step done again
                optimizer.zero_grad(set_to_none=True)
                if saved is None or run_folder.checkpoint_step(saved) != step - 1:
                    saved = checkpoint(step - 1, rng=rng, records=records)
                run_folder.stopped(stop, f"during step {step} of {cfg.steps}, before its update", saved, argv)
            record = {"step": step, **record}
            if rank == 0:
                run_folder.show_and_keep_trees(out, roots, problems, tokenizer, step, cfg.show_tree_every,
                                               cfg.save_trees)
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kept_nodes=record["kept_nodes"])
    if rank == 0:
        print(run_folder.closing_line(out, begin.step, cfg.steps, time.perf_counter() - started)
              + (" (a smoke run: a tiny random model answers nothing; it checks that every path runs)" if cfg.smoke else ""))
    return record


def evaluation(model, tokenizer, eval_problems, cfg: Config, device: str, step: int, stop) -> dict:
    """The evaluation due after `step` (0, every --eval-every, the last), with its seconds, or {}."""
    if step and not ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
        return {}
    start = time.perf_counter()
    with stop.droppable():
        scores = evaluate(model, tokenizer, eval_problems, cfg, device, stop)
    return scores | ({"eval_s": time.perf_counter() - start} if step else {})


def train_step(model, ref_model, tokenizer, optimizer, problems: list[dict], cfg: Config, device: str, stop=None):
    """Sample and score this process's share of the step's questions, then `learn` from every
    process's trees. Returns (the step's record, every tree). stop: the run's GracefulStop."""
    rank, world = distributed.rank_and_world()
    start = time.perf_counter()
    with gpu.phase("sampling"):
        mine = sample_and_score(model, tokenizer, distributed.share(problems, rank, world), cfg, device)
    sampled = time.perf_counter()
    record, roots = learn(model, ref_model, optimizer, mine, cfg, device, stop)
    return record | {"sample_s": sampled - start, "loss_and_update_s": time.perf_counter() - sampled}, roots


def learn(model, ref_model, optimizer, mine: list, cfg: Config, device: str, stop=None):
    """Credit every process's scored trees (the same advantages in every process), then
    --updates-per-batch rounds of loss and update on this process's trees (`mine`). Returns (the
    record over every tree: the first update's loss, the mean clip fraction; every tree)."""
    rank, world = distributed.rank_and_world()
    roots = credit(distributed.gather(mine), cfg)
    model.train()  # sample_trees switched to eval mode for sampling and back
    trees = roots
    if cfg.method == "treepo":  # per-leaf scores: each segment once, or (clipping) each leaf's path
        trees = treepo.weighted_trees(roots) if cfg.updates_per_batch == 1 else treepo.path_trees(roots)
    my_trees, total = distributed.share(trees, rank, world), counted_tokens(trees)  # divide by the batch's count
    updates = []  # the first update's log-probs are the old ones of the later updates: its ratio is exactly 1
    while len(updates) < cfg.updates_per_batch and not (updates and updates[-1]["skipped"]):
        keep = not updates and cfg.updates_per_batch > 1
        updates.append(update(model, ref_model, optimizer, my_trees, total, cfg, device, stop, keep_logprobs=keep))
    clip_fractions = [done["clip_fraction"] for done in updates]
    return {**tree_metrics(roots, cfg.method), **updates[0], "clip_fraction": sum(clip_fractions) / len(updates),
            "clip_fractions": clip_fractions, "updates": len(updates), "skipped": updates[-1]["skipped"]}, roots


def update(model, ref_model, optimizer, trees, total_tokens, cfg: Config, device: str, stop=None,
           keep_logprobs=False) -> dict:
    """The loss, back-propagated (divided by the batch's `total_tokens`; every process's gradients
    summed), and one AdamW step: never with a loss or gradient that is not finite (the weights stay
    finite), nor when nothing counted (weight decay alone should not step). From the AdamW step on,
    a stop waits for the step's end (`stop.commit()`): the weights have moved."""
    with gpu.phase("the loss"), gpu.autocast(device, cfg.dtype):
        loss, stats = backward_loss(model, trees, ref_model=ref_model, kl_coef=cfg.kl_coef, clip_eps=cfg.clip_eps,
                                    temperature=cfg.temperature, packed=LOSS_ROWS[cfg.loss_rows],
                                    max_row_tokens=cfg.max_row_tokens, micro_batch_size=cfg.micro_batch_size,
                                    total_tokens=total_tokens, keep_logprobs=keep_logprobs)
    distributed.sum_gradients(trainable(model))
    loss, stats = distributed.sum_loss_stats(loss, stats, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip).item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    with gpu.phase("the optimizer step"):
        if stats["tokens"] and not skipped:
            if stop is not None:
                stop.commit()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, **stats, "grad_norm": grad_norm, "skipped": skipped}


def sample_and_score(model, tokenizer, problems: list[dict], cfg: Config, device: str):
    """Sample one tree per problem and reward its leaves."""
    prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in problems]
    roots = []
    for start in tqdm(range(0, len(prompts), cfg.sample_batch_size), desc="sampling", leave=False):
        with gpu.autocast(device, cfg.dtype):
            try:
                roots += sample(model, tokenizer, prompts[start:start + cfg.sample_batch_size], cfg)
            except ValueError as error:  # a guard of treerpo.py's, already one line
                raise SystemExit(f"sampling refused: {error}")
            except RuntimeError as error:  # torch.multinomial on NaN or infinite probabilities
                if isinstance(error, torch.cuda.OutOfMemoryError) or not ("inf" in str(error) or "nan" in str(error)):
                    raise
                raise SystemExit(f"sampling failed: the model's next-token probabilities are not finite ({error}); "
                                 "the weights have diverged: lower --lr (the last checkpoint holds finite weights)")
    for root, problem in zip(roots, problems):
        for leaf in leaves(root):
            text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
            leaf.reward = score(leaf, text, problem, strict=cfg.reward == "strict")
    return roots


def credit(roots, cfg: Config):
    """Values and advantages: TreeRPO's and GRPO's within each tree, TreePO's per leaf, whitened
    over the whole batch. Returns `roots`."""
    try:
        if cfg.method == "treepo":
            treepo.assign_treepo_advantages(roots)  # per leaf, whitened over the whole batch
        else:
            for root in roots:
                assign_advantages(root, norm=cfg.norm, tau=cfg.tau)
    except ValueError as error:  # e.g. rewards so large that their mean overflows: say it in one line
        raise SystemExit(f"the advantages cannot be computed: {error}")
    return roots


def sample(model, tokenizer, prompts: list[str], cfg: Config):
    """The three methods differ here (what they sample) and in the credit; the rest is shared. No
    log-probs are recorded: PPO's old ones are the first update's (`learn`), computed as the later
    updates compute theirs, where generate's cached decoding differs in bf16."""
    settings = dict(temperature=cfg.temperature)
    if cfg.method == "treepo":
        return treepo.sample_budgeted_trees(model, tokenizer, prompts, width=cfg.width, divergence=cfg.divergence,
                                            segment_tokens=cfg.segment_tokens, max_depth=cfg.depth, **settings)
    if cfg.method == "grpo":  # GRPO is a one-level tree: G answers with the tree's whole response budget
        return sample_trees(model, tokenizer, prompts, branch=cfg.width, depth=1,
                            segment_tokens=cfg.depth * cfg.segment_tokens, **settings)
    return sample_trees(model, tokenizer, prompts, branch=cfg.branch, depth=cfg.depth,
                        segment_tokens=cfg.segment_tokens, **settings)


def score(leaf, text: str, problem: dict, strict: bool) -> float:
    """The verifier's reward for `text`, the answer ending at `leaf`, checked a finite number
    (reward_of) where it is made, so that the error can quote the answer."""
    leaf.reward = gsm8k_reward(text, problem["answer"], strict=strict)
    try:
        return reward_of(leaf)
    except ValueError as error:
        raise SystemExit(f"the verifier's reward for the answer {text[:80]!r}: {error}")


def evaluate(model, tokenizer, problems: list[dict], cfg: Config, device: str, stop=None) -> dict:
    """Greedy Pass@1, strict and lenient: a tree of one branch and one level is one greedy answer.
    Each process answers its share of the questions, in as many batches as every other (a stop is
    checked between them, by all at once); the scores are summed."""
    strict = lenient = length = truncated = 0
    rank, world = distributed.rank_and_world()
    mine = distributed.share(problems, rank, world)
    for start in tqdm(range(0, -(-len(problems) // world), cfg.eval_batch_size), desc="evaluating", leave=False):
        if stop is not None and distributed.anyone(stop.requested, device):
            raise run_folder.Dropped
        batch = mine[start:start + cfg.eval_batch_size]
        if not batch:  # this process's share ended a batch early: it still checks for a stop with the others
            continue
        prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in batch]
        with gpu.phase("evaluation"), gpu.autocast(device, cfg.dtype):
            try:
                roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1,
                                     segment_tokens=cfg.depth * cfg.segment_tokens, do_sample=False)
            except ValueError as error:  # a guard of treerpo.py's, already one line
                raise SystemExit(f"evaluation refused: {error}")
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)  # decoded once, scored twice
            strict += score(answer, text, problem, strict=True)
            lenient += score(answer, text, problem, strict=False)
            length, truncated = length + len(answer.tokens), truncated + (not answer.finished)  # cut at D x L
    sums = distributed.sum_numbers({"strict": strict, "lenient": lenient, "length": length, "cut": truncated}, device)
    n = len(problems)
    return {"eval_strict": sums["strict"] / n, "eval_lenient": sums["lenient"] / n,
            "eval_response_tokens": sums["length"] / n, "eval_truncated": sums["cut"] / n, "eval_questions": n}


def tree_metrics(roots, method: str) -> dict:
    """What the sampled trees look like: rewards, sizes, and the failure-mode figures."""
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
    metrics = {
        "reward": sum(leaf.reward for leaf in all_leaves) / len(all_leaves),
        "solve_rate": sum(any(leaf.reward > 0 for leaf in leaves(root)) for root in roots) / len(roots),
        "leaves": len(all_leaves),
        "segments": sum(len(nodes(root)) - 1 for root in roots),
        "tokens_generated": sum(len(node.tokens) for root in roots for node in nodes(root)[1:]),
        "response_tokens": sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves),
        "truncated": sum(not leaf.finished for leaf in all_leaves) / len(all_leaves),  # no EOS by the last level
    }
    if method != "treepo":  # TreePO credits leaves, not sibling groups: it prunes none
        metrics["pruned_groups"] = sum(group[0].advantage is None for group in groups) / len(groups)
    return metrics


def parse_args(argv) -> tuple[Config, list[str] | None]:
    return flags.parse_args(Config, SMOKE, argv, __doc__)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, plot_dirs = parse_args(argv)
    if plot_dirs:
        from pictures import plots
        print(f"wrote {plots.plot(plot_dirs)}")
        return
    try:
        train(cfg, argv)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"\naborted. {run_folder.where_to_go_on(Path(cfg.out), argv, cfg.steps)}", file=sys.stderr)
        raise SystemExit(130)
    except OSError as error:
        if not run_folder.is_disk_full(error):
            raise
        raise SystemExit(f"the disk is full ({error}). Free some space; "
                         f"{run_folder.where_to_go_on(Path(cfg.out), argv, cfg.steps)}")


if __name__ == "__main__":
    main()
