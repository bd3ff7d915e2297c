"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU (or a CPU), in one loop.

    python train_gsm8k.py                                  # TreeRPO: branch 4, depth 2, 192-token segments
    python train_gsm8k.py --method grpo --out out/grpo     # GRPO (8 answers), or treepo: the same loop
    python train_gsm8k.py --smoke                          # every path, offline, on the CPU, in seconds
    torchrun --standalone --nproc_per_node 4 train_gsm8k.py    # data-parallel (demo/distributed.py)

A step: take --prompts-per-step questions, sample a tree for each (treerpo.py; GRPO is a tree of one
level, TreePO a budgeted tree from treepo.py), reward every leaf (reward.py), assign values and
advantages, back-propagate the loss, clip the gradient, take an AdamW step; then evaluate, log and
save when due. Into --out: run.json, metrics.jsonl (a record a step) and the newest checkpoint.
Ctrl-C or SIGTERM lets the step under way finish, saves, and prints the command that goes on (a
second stops at once); --resume redoes everything after the last checkpoint exactly.

What the demo leaves out: a learning-rate schedule and warm-up; sampling with vLLM (HF `generate` is
slow); a stop inside a step (the step finishes first); a checkpoint file whose bytes changed but still
loads (one missing or cut short is refused); a message per phase when the GPU runs out of memory
(docs/demo.md lists each phase's knobs); any data but GSM8K-format question/answer pairs.
"""

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import treepo
from demo import checkpoints, distributed, flags, models, records, stops
from demo.evaluation import evaluate
from demo.flags import knob
from reward import chat_prompt, gsm8k_reward, load_problems
from treerpo import (NORMS, assign_advantages, backward_loss, counted_tokens, leaves, response_tokens, sample_trees,
                     scale_by_step)


@dataclass
class Config:
    model: str = knob("Qwen/Qwen2.5-0.5B-Instruct", "hub model name, a local model folder, or 'tiny' (offline)")
    data: str = knob("openai/gsm8k", "hub dataset; a folder with train.jsonl and test.jsonl; TRAIN.jsonl,TEST.jsonl; "
                                     "'easy' or 'steps' (generated word problems); 'smoke' (12 built-in problems)")
    out: str = knob("out/treerpo", "the run's folder: run.json, metrics.jsonl, checkpoint-<step>/")
    method: str = knob("treerpo", "treerpo: a tree; grpo: --width answers of a leaf's budget; treepo: "
                                  "treepo.py's budgeted tree of --width leaves", choices=("treerpo", "grpo", "treepo"))
    # the tree: N=4, D=2, L=192 is 20 segments, 16 leaves, at most 3,840 generated tokens a question (docs/cost.md)
    branch: int = knob(4, "treerpo: children per node (N)", at_least=1)
    depth: int = knob(2, "levels of segments below the prompt (D); an answer is at most D x L tokens", at_least=1)
    segment_tokens: int = knob(192, "tokens per segment (L)", at_least=1)
    layout: str = knob("", "treerpo: NxL a level, in place of --branch, --depth, --segment-tokens (6x128,2x256)")
    width: int = knob(8, "grpo: answers per question (G); treepo: the leaf budget per question (W)", at_least=1)
    divergence: int = knob(2, "treepo: continuations per active path and level, budget permitting", at_least=1)
    temperature: float = knob(0.6, "sampling temperature (the paper's recipe, unchecked: docs/method.md)", above=0)
    system_prompt: str = knob("demo", "the system message: demo, brief or lines (reward.SYSTEM_PROMPTS), or any text")
    # reward, advantages and loss
    reward: str = knob("strict", "strict: only a \\boxed{} or #### answer counts; lenient: the last number too",
                       choices=("strict", "lenient"))
    norm: str = knob("std", "a group's advantage normalisation; step: the group's mean over one scale for the step",
                     choices=(*NORMS, "step"))
    tau: float = knob(0.1, "drop sibling groups whose values span less than this", at_least=0)
    root_term: str = knob("none", "treerpo: also compare each node with the whole question: treerl or grpo "
                                  "(treerpo.assign_advantages), treepo (treepo.py's per-leaf credit)",
                          choices=("none", "treerl", "grpo", "treepo"))
    clip_eps: float = knob(0.2, "PPO clip range", above=0)
    kl_coef: float = knob(0.001, "k3 KL to the starting model; 0 loads no reference copy", at_least=0)
    # optimisation
    steps: int = knob(200, "optimizer steps (0: evaluate only)", at_least=0)
    prompts_per_step: int = knob(8, "GSM8K questions (trees) per step, over all processes", at_least=1)
    sample_batch_size: int = knob(8, "prompts per sampling call (lower it to save memory)", at_least=1)
    loss_rows: str = knob("auto", "packed (a tree a row, tree mask), leaf-paths (a row a leaf), or auto (packed where "
                                  "it gives the leaf paths' log-probs)", choices=("auto", "packed", "leaf-paths"))
    updates_per_batch: int = knob(1, "AdamW steps on each batch of trees (PPO's mu): the first update's log-probs "
                                     "are the old ones, the later updates clip", at_least=1)
    max_row_tokens: int = knob(2048, "packed loss: tokens per row (one forward); bigger trees are split", at_least=1)
    micro_batch_size: int = knob(8, "leaf-paths loss: rows per forward", at_least=1)
    lr: float = knob(1e-6, "AdamW learning rate, constant", above=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = knob(1.0, "gradient norm clip", above=0)
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory")
    lora_rank: int = knob(0, "train LoRA adapters of this rank (needs peft); 0: every weight", at_least=0)
    # evaluation and bookkeeping
    eval_every: int = knob(25, "evaluate every this many steps (0: only before and after)", at_least=0)
    eval_size: int = knob(200, "held-out GSM8K test questions to evaluate on", at_least=1)
    eval_batch_size: int = knob(64, "questions per greedy generate call in evaluation", at_least=1)
    save_every: int = knob(50, "checkpoint every this many steps (and at the end)", at_least=1)
    save_trees: bool = knob(False, "write every step's trees to <out>/trees.jsonl (probes/credit.py reads them)")
    show_tree_every: int = knob(0, "print the step's first tree every this many steps", at_least=0)
    seed: int = knob(0, "random seed (data order and sampling)")
    device: str = knob("auto", "cuda, cuda:N, cpu, or auto (a GPU; the CPU only when asked)")
    dtype: str = knob("auto", "compute precision, the weights staying fp32: bf16 (autocast), fp32, or auto (bf16 on "
                              "a GPU and on a CPU with bf16 instructions)", choices=("auto", "bf16", "fp32"))
    resume: bool = knob(False, "go on from the checkpoint in --out")
    overwrite: bool = knob(False, "start over in an --out that holds a run (what a run writes there is deleted)")
    smoke: bool = knob(False, "every path, offline, on the CPU, in seconds (tiny model, smoke data, out/smoke)")

    def levels(self) -> tuple[list[int], list[int]]:
        """The tree's children a node and tokens a segment, a level each: --layout's ('6x128,2x256'), or
        --branch and --segment-tokens at each of --depth levels."""
        pairs = [level.split("x") for level in self.layout.split(",")] if self.layout else \
            [(self.branch, self.segment_tokens)] * self.depth
        return [int(branch) for branch, _ in pairs], [int(tokens) for _, tokens in pairs]

    def answer_tokens(self) -> int:
        """An answer's budget: a leaf's tokens at most, GRPO's answers' and the evaluation's length."""
        return sum(self.levels()[1])


# --smoke changes these defaults (flags on the command line still win). fp32: the same numbers on every CPU.
SMOKE = dict(model="tiny", data="smoke", out="out/smoke", branch=2, depth=2, segment_tokens=8, steps=4,
             prompts_per_step=4, sample_batch_size=2, micro_batch_size=4, lr=3e-3, eval_every=2, eval_size=12,
             eval_batch_size=6, save_every=2, show_tree_every=2, width=4, device="cpu", dtype="fp32", reward="lenient")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)  # every mistake is one line, before anything loads
    rank, world, device = distributed.start("cuda" if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    lock = checkpoints.hold(out) if rank == 0 else None  # one run per folder
    try:
        with stops.Stop() as stop:
            run(cfg, argv, out, rank, world, device, stop)
    except KeyboardInterrupt:  # a second Ctrl-C
        newest = checkpoints.newest(out)
        go_on = f"resume with: {stops.command(argv, '--resume')}" if newest else \
            f"start over with: {stops.command(argv, '--overwrite')}"
        stops.say(f"\naborted; the last checkpoint is {newest}; {go_on}", sys.stderr)
        raise SystemExit(130)
    except ValueError as error:  # one of treerpo.py's checks (a reward that is not a finite number, ...)
        raise SystemExit(f"stopped: {error}")
    finally:
        distributed.finish()
        if lock:
            lock.release()


def parse_args(argv) -> Config:
    return flags.parse_args(Config, SMOKE, argv, __doc__)


def run(cfg, argv, out, rank, world, device, stop):
    checkpoint = checkpoints.newest(out) if cfg.resume else None
    if rank == 0 and cfg.overwrite:
        checkpoints.clear(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    questions = load_problems(cfg.data, "train")  # the data first: a bad file fails before the model loads
    random.Random(cfg.seed).shuffle(questions)  # one fixed order, so a resumed run takes the next questions
    held_out = load_problems(cfg.data, "test")[:cfg.eval_size]
    model, tokenizer = models.load(cfg, checkpoint)
    flags.check_context(model, tokenizer, questions + held_out, cfg)
    model.to(device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]  # all, or LoRA's
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_model = models.reference_model(cfg, model, device)
    if world > 1:  # each process samples its own answers
        torch.manual_seed(cfg.seed * 1000 + rank)
    state = checkpoints.restore(checkpoint, optimizer, rank) if checkpoint else {"step": 0, "failing": 0}
    metrics, trees_file, begin = out / "metrics.jsonl", out / "trees.jsonl", state["step"]
    if rank == 0:  # a line a step, and step 0's before: the records end where the checkpoint does
        records.keep_first(metrics, begin + 1 if checkpoint else 0)
        records.keep_first(trees_file, begin)
        (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if not checkpoint:  # the held-out score before training
        log(metrics, rank, {"step": 0, **evaluate(model, tokenizer, held_out, cfg, device)})
    if distributed.sum_numbers({"stop": bool(stop.requested)}, device)["stop"]:  # every process stops here
        flag = "--resume" if checkpoint else "--overwrite"  # a resumed run keeps its checkpoint
        stops.say(f"stopped before training; go on with: {stops.command(argv, flag)}")
        raise SystemExit(130)
    started, bar = time.perf_counter(), tqdm(total=cfg.steps, initial=begin, desc="training", disable=rank > 0)
    for step in range(begin + 1, cfg.steps + 1):
        first = (step - 1) * cfg.prompts_per_step
        problems = [questions[i % len(questions)] for i in range(first, first + cfg.prompts_per_step)]
        start = time.perf_counter()

        # Sample a tree for each of this process's questions, and reward every leaf's whole answer.
        mine = distributed.share(problems)
        roots = []
        for batch in range(0, len(mine), cfg.sample_batch_size):
            prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt)
                       for problem in mine[batch:batch + cfg.sample_batch_size]]
            with models.autocast(device, cfg.dtype):
                roots += sample(model, tokenizer, prompts, cfg)
        for root, problem in zip(roots, mine):
            for leaf in leaves(root):
                text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
                leaf.reward = gsm8k_reward(text, problem["answer"], strict=cfg.reward == "strict")

        # Values and advantages over every process's trees, then the loss on this process's share.
        roots = distributed.gather(roots)
        trees = credit(roots, cfg)
        sampled, updates = time.perf_counter(), []
        model.train()
        while len(updates) < cfg.updates_per_batch and not (updates and updates[-1]["skipped"]):
            with models.autocast(device, cfg.dtype):
                loss, stats = backward_loss(model, distributed.share(trees), ref_model=ref_model, kl_coef=cfg.kl_coef,
                                            clip_eps=cfg.clip_eps, temperature=cfg.temperature,
                                            packed={"auto": None, "packed": True}.get(cfg.loss_rows, False),
                                            max_row_tokens=cfg.max_row_tokens, micro_batch_size=cfg.micro_batch_size,
                                            total_tokens=counted_tokens(trees),
                                            keep_logprobs=not updates and cfg.updates_per_batch > 1)
            distributed.sum_gradients(trainable)
            mine = {"loss": loss, "abs_advantage": stats["mean_abs_advantage"] * stats["kept_nodes"]}
            stats |= distributed.sum_numbers(mine | {key: stats[key] for key in SUMMED}, device)
            stats["mean_abs_advantage"] = stats.pop("abs_advantage") / max(stats["kept_nodes"], 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
            skipped = not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm))
            if stats["tokens"] and not skipped:  # never a step on a loss or gradient that is not finite
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates.append(stats | {"grad_norm": grad_norm, "skipped": skipped})

        # The step's record; its evaluation and checkpoint when due, or when the run must stop.
        clip_fractions = [update["clip_fraction"] for update in updates]
        record = {"step": step, **records.tree_metrics(roots), **updates[0], "skipped": updates[-1]["skipped"],
                  "clip_fraction": sum(clip_fractions) / len(updates), "clip_fractions": clip_fractions,
                  "updates": len(updates), "sample_s": sampled - start,
                  "loss_and_update_s": time.perf_counter() - sampled}
        if rank == 0 and cfg.save_trees:
            records.append(trees_file, records.trees_record(step, roots, problems))
        if rank == 0 and cfg.show_tree_every and step % cfg.show_tree_every == 0:
            from pictures.tree_text import format_tree
            tqdm.write(f"step {step}, first question:\n{format_tree(roots[0], tokenizer, width=48)}\n")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            evaluated = time.perf_counter()
            record |= evaluate(model, tokenizer, held_out, cfg, device) | {"eval_s": time.perf_counter() - evaluated}
        log(metrics, rank, record | models.peak_memory(device))
        state |= {"step": step, "failing": state["failing"] + 1 if record["skipped"] else 0}
        bar.update()
        bar.set_postfix(reward=f"{record['reward']:.3f}", kept_nodes=record["kept_nodes"])
        stopping = distributed.sum_numbers({"stop": bool(stop.requested)}, device)["stop"] > 0 and step < cfg.steps
        if step % cfg.save_every == 0 or step == cfg.steps or stopping or state["failing"] >= 3:
            saved = save(out, model, tokenizer, optimizer, state, rank, world)
        if state["failing"] >= 3:
            raise SystemExit(f"steps {step - 2}-{step} had a non-finite loss or gradient norm, so none was applied "
                             f"(a learning rate too high?); the last checkpoint is {saved}")
        if stopping:
            if rank == 0:
                stops.say(f"stopped by {stop.requested} after step {step} of {cfg.steps}; checkpoint in {saved}. "
                          f"Resume with: {stops.command(argv, '--resume')}")
            raise SystemExit(130)
    if rank == 0:
        evaluations = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval_strict"' in line]
        scores = {kind: f"{evaluations[0][f'eval_{kind}']:.0%} -> {evaluations[-1][f'eval_{kind}']:.0%}"
                  for kind in ("strict", "lenient")}
        done = f"steps {begin + 1}-{cfg.steps}" if cfg.steps > begin else "the evaluation only"
        stops.say(f"done: {done} in {time.perf_counter() - started:.0f} s; held-out Pass@1 ({len(held_out)} "
                  f"questions) strict {scores['strict']}, lenient {scores['lenient']}; metrics in {metrics}")


SUMMED = ("tokens", "kept_nodes", "pruned_nodes", "positions", "forwards", "logit_positions", "kl", "clip_fraction")


def sample(model, tokenizer, prompts: list[str], cfg: Config):
    """The methods differ here (what they sample) and in `credit`; the rest of the step is shared."""
    if cfg.method == "treepo":
        return treepo.sample_budgeted_trees(model, tokenizer, prompts, width=cfg.width, divergence=cfg.divergence,
                                            segment_tokens=cfg.segment_tokens, max_depth=cfg.depth,
                                            temperature=cfg.temperature)
    if cfg.method == "grpo":  # a one-level tree: G answers with the tree's whole answer budget
        return sample_trees(model, tokenizer, prompts, branch=cfg.width, depth=1,
                            segment_tokens=cfg.answer_tokens(), temperature=cfg.temperature)
    branches, segments = cfg.levels()
    return sample_trees(model, tokenizer, prompts, branch=branches, depth=len(branches), segment_tokens=segments,
                        temperature=cfg.temperature)


def credit(roots, cfg: Config) -> list:
    """Values and advantages; returns the trees the loss trains. TreeRPO and GRPO: within each tree.
    TreePO: per leaf, whitened over the batch, each leaf's score on its whole path."""
    if cfg.method == "treepo" or cfg.root_term == "treepo":
        treepo.assign_treepo_advantages(roots)
        return treepo.weighted_trees(roots) if cfg.updates_per_batch == 1 else treepo.path_trees(roots)
    for root in roots:
        assign_advantages(root, norm="none" if cfg.norm == "step" else cfg.norm, tau=cfg.tau,
                          root_term=None if cfg.root_term == "none" else cfg.root_term)
    if cfg.norm == "step":  # one scale over the whole batch, every process's trees
        scale_by_step(roots)
    return roots


def log(path: Path, rank: int, record: dict):
    if rank == 0:  # process 0 keeps the run's records
        records.append(path, record)


def save(out: Path, model, tokenizer, optimizer, state: dict, rank: int, world: int) -> Path | None:
    """The checkpoint, written by process 0 with every process's random state; the others wait for it."""
    rng = distributed.gather([checkpoints.rng_state()])  # by rank
    saved = checkpoints.save(out, model, tokenizer, optimizer, rng, state | {"processes": world}) if rank == 0 else None
    distributed.gather([None])  # a barrier: no process goes on before the checkpoint is whole
    return saved


if __name__ == "__main__":
    main()
