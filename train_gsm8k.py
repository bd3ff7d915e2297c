"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU.

    python train_gsm8k.py                                     # TreeRPO: branch 4, depth 2, 192-token segments
    python train_gsm8k.py --method grpo --out out/grpo        # GRPO (or treepo): 8 answers, the same code path
    python train_gsm8k.py --smoke                             # every path, offline, on the CPU, in seconds

Each step of the loop (`train`), for --prompts-per-step questions:
    sample     one tree per question (treerpo.sample_trees; GRPO is a tree of one level)
    score      every leaf with the GSM8K reward (reward.py): strict by default, only \\boxed{}/#### count
    credit     node values and sibling advantages (treerpo.assign_advantages; TreePO: per leaf)
    loss       PPO-clip on every kept segment, back-propagated (treerpo.backward_loss)
    update     one AdamW step, never with a loss or gradient that is not finite
    evaluate   greedy Pass@1 on held-out questions before, every --eval-every steps and at the end
    save       an atomic checkpoint every --save-every steps (demo/checkpoints.py); --resume goes on exactly
into <out>: metrics.jsonl (a record a step) and checkpoint-<step>/. Every knob is a field of Config and a
flag, checked before anything loads (demo/flags.py).
"""

import dataclasses
import functools
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
from demo import checkpoints, device as devices, distributed, evaluation, flags, records, stops
from demo.flags import knob
from demo.models import load_model_and_tokenizer, reference_model, trainable
from reward import chat_prompt, gsm8k_reward, load_problems
from treerpo import (NORMS, assign_advantages, backward_loss, counted_tokens, leaves, response_tokens, reward_of,
                     sample_trees, scale_by_step)

METHODS = ("treerpo", "grpo", "treepo")
LOSS_ROWS = {"auto": None, "packed": True, "leaf-paths": False}  # --loss-rows -> backward_loss(packed=...)


@dataclass
class Config:
    model: str = knob("Qwen/Qwen2.5-0.5B-Instruct", "hub model name, a local model folder, or 'tiny' (offline)")
    data: str = knob("openai/gsm8k", "hub dataset; a folder with train.jsonl and test.jsonl; TRAIN.jsonl,TEST.jsonl; "
                                     "'easy' or 'steps' (generated word problems); 'smoke' (12 built-in problems)")
    out: str = knob("out/treerpo", "the run's folder: metrics.jsonl, checkpoint-<step>/, trees/")
    method: str = knob("treerpo", "treerpo: a tree; grpo: --width answers of depth x segment-tokens tokens; "
                                  "treepo: treepo.py's budgeted tree of --width leaves", choices=METHODS)
    # the tree: N=4, D=2, L=192 is 20 segments, 16 leaves, at most 3,840 generated tokens a question (docs/cost.md)
    branch: int = knob(4, "treerpo: children per node (N); with --depth 1 this is GRPO's group size", at_least=1)
    depth: int = knob(2, "levels of segments below the prompt (D); an answer is at most D x L tokens", at_least=1)
    segment_tokens: int = knob(192, "tokens per segment (L)", at_least=1)
    layout: str = knob("", "treerpo: one NxL a level, in place of --branch, --depth and --segment-tokens: "
                           "6x128,2x256 is 6 openings of 128 tokens, then 2 continuations of 256 each")
    width: int = knob(8, "grpo: answers per question (G); treepo: the leaf budget per question (W)", at_least=1)
    divergence: int = knob(2, "treepo: continuations per active path and level, budget permitting", at_least=1)
    temperature: float = knob(0.6, "sampling temperature (the paper's recipe, unchecked: docs/method.md)", above=0)
    system_prompt: str = knob("demo", "the system message: demo, brief or lines (reward.SYSTEM_PROMPTS), or any text")
    # reward, advantages and loss
    reward: str = knob("strict", "strict: only a \\boxed{} or #### answer counts; lenient: the last number counts too",
                       choices=("strict", "lenient"))
    norm: str = knob("std", "advantage normalisation: a group's std, bernoulli, none, or step (the group's mean, "
                            "divided by one scale over the step's kept advantages)", choices=(*NORMS, "step"))
    tau: float = knob(0.1, "drop sibling groups whose values span less than this", at_least=0)
    root_term: str = knob("none", "treerpo: also compare each node with the whole question: treerl, grpo "
                                  "(treerpo.assign_advantages) or treepo (treepo.py's credit per leaf)",
                          choices=("none", "treerl", "grpo", "treepo"))
    clip_eps: float = knob(0.2, "PPO clip range", above=0)
    kl_coef: float = knob(0.001, "k3 KL to the starting model; 0 loads no reference copy", at_least=0)
    # optimisation
    steps: int = knob(200, "optimizer steps", at_least=0)
    prompts_per_step: int = knob(8, "GSM8K questions (trees) per step", at_least=1)
    sample_batch_size: int = knob(8, "prompts per sample_trees call (lower it to save memory)", at_least=1)
    loss_rows: str = knob("auto", "packed (each segment once, under a tree mask), leaf-paths (a row per leaf), or "
                                  "auto (packed where the model allows)", choices=tuple(LOSS_ROWS))
    updates_per_batch: int = knob(1, "optimizer steps on each batch of trees (PPO's mu); more than 1: the first "
                                     "update's log-probs are the old ones, the later updates clip", at_least=1)
    max_row_tokens: int = knob(2048, "packed loss: tokens per row (one forward); bigger trees are split", at_least=1)
    micro_batch_size: int = knob(8, "leaf-paths loss: rows per forward/backward", at_least=1)
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
    show_tree_every: int = knob(0, "print the step's first tree every this many steps (into <out>/trees/)", at_least=0)
    seed: int = knob(0, "random seed (data order and sampling)")
    device: str = knob("auto", "cuda, cpu, or auto (cuda; the CPU only when asked or with --smoke)")
    dtype: str = knob("auto", "compute precision (weights and AdamW stay fp32): bf16 (autocast), fp32, or auto "
                              "(bf16 on a GPU, fp32 on a CPU)", choices=devices.DTYPES)
    resume: bool = knob(False, "continue from the newest checkpoint in --out")
    overwrite: bool = knob(False, "start over in an --out that already holds a run (its files are deleted)")
    smoke: bool = knob(False, "offline CPU run of every path in seconds (tiny model, smoke data, into out/smoke)")


# --smoke changes these defaults (flags given on the command line still win, --model and --data too).
SMOKE = dict(model="tiny", data="smoke", out="out/smoke", branch=2, depth=2, segment_tokens=8, steps=4,
             prompts_per_step=4, sample_batch_size=2, micro_batch_size=4, lr=3e-3, eval_every=2, eval_size=12,
             eval_batch_size=6, save_every=2, show_tree_every=2, width=4, device="cpu", reward="lenient")


def train(cfg: Config, argv: list[str] = ()) -> dict | None:
    """The run, from step 0 or the newest checkpoint (--resume); returns the last record. argv: the command
    line, for the command a stopped run prints. Under torchrun each process runs this; process 0 owns --out."""
    rank, world, device = distributed.start(devices.pick_device(cfg.device))
    out, owner = Path(cfg.out), rank == 0
    if owner and (note := devices.precision_note(device, cfg.dtype)):
        print(note, file=sys.stderr)
    try:
        with checkpoints.opened(out, overwrite=cfg.overwrite, resume=cfg.resume, owner=owner) as checkpoint:
            checkpoint = distributed.gather([checkpoint])[0]  # process 0's, once it holds the folder
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            train_problems = load_problems(cfg.data, "train")  # data first: a bad file fails before the model loads
            random.Random(cfg.seed).shuffle(train_problems)  # one fixed order, so a resumed run sees the next ones
            eval_problems = flags.first_questions(load_problems(cfg.data, "test"), cfg.eval_size, say=owner)
            model, tokenizer = load_model_and_tokenizer(cfg, checkpoint)  # the same weights in every process
            flags.check_context(model, tokenizer, train_problems + eval_problems, cfg)
            model.to(device)
            optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
            ref_model = reference_model(cfg, model, device)
            if world > 1:  # each process samples its own answers
                torch.manual_seed(cfg.seed * 1000 + rank)
            begin = checkpoints.resume_run(checkpoint, optimizer, out, rank) if checkpoint else checkpoints.Begin()
            if owner:
                (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))  # what this run is
            return run(model, ref_model, tokenizer, optimizer, train_problems, eval_problems, begin, cfg, device, argv)
    finally:
        distributed.finish()


def run(model, ref_model, tokenizer, optimizer, train_problems, eval_problems, begin, cfg, device, argv):
    """The loop from `begin`: a step samples, credits and updates, then `close_step` evaluates, records
    and saves when due. A stop drops a step before its update, or an evaluation: resumed, they are
    done again exactly (demo/stops.py)."""
    out, rank, world = Path(cfg.out), *distributed.rank_and_world()
    started, record = time.perf_counter(), None
    history = records.logged_steps(out / "metrics.jsonl") if begin.step else []  # the health's, as it was
    save = functools.partial(checkpoints.save_step, out, model=model, tokenizer=tokenizer, optimizer=optimizer, cfg=cfg)
    with records.Log(out, rank == 0, begin.metrics_records, history) as log, stops.Stop(can_drop=world == 1) as stop, \
            tqdm(total=cfg.steps, initial=begin.step, desc="training", disable=rank > 0) as bar:
        close = functools.partial(close_step, model, tokenizer, eval_problems, log, save, stop, cfg, device, argv)
        if begin.pending or (begin.step == 0 and begin.metrics_records == 0):  # step 0's evaluation, or a pending one
            record = close(begin.pending or {"step": 0}, due_save=bool(begin.pending))
        for step in range(begin.step + 1, cfg.steps + 1):
            random_state = checkpoints.rng_state()  # what a stop before the update saves, as step - 1's
            problems = [train_problems[((step - 1) * cfg.prompts_per_step + i) % len(train_problems)]
                        for i in range(cfg.prompts_per_step)]
            try:
                record, roots = train_step(model, ref_model, tokenizer, optimizer, problems, cfg, device, stop.begin())
            except stops.Dropped:  # the weights are still step - 1's: saved as such, unless the newest checkpoint is
                optimizer.zero_grad(set_to_none=True)
                saved = checkpoints.newest_step(out, step - 1) or \
                    save(step - 1, rng=random_state, metrics_records=log.kept)
                stops.exit_stopped(stop, f"during step {step} of {cfg.steps}, before its update", saved, argv)
            if rank == 0:
                records.show_and_keep_trees(out, roots, problems, tokenizer, step, cfg.show_tree_every, cfg.save_trees)
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kept_nodes=record["kept_nodes"])
            record = close({"step": step, **record}, due_save=step % cfg.save_every == 0 or step == cfg.steps)
    if rank == 0:
        stops.say(records.closing_line(out, begin.step, cfg, time.perf_counter() - started,
                                       (checkpoints.checkpoints(out) or [None])[-1]))
    return record


def close_step(model, tokenizer, eval_problems, log, save, stop, cfg, device, argv, record, due_save) -> dict:
    """After a step (0: before training): its evaluation if due, its record, a checkpoint if due or if
    the run must stop (a stop signal, or steps that cannot train). Returns the record."""
    step, random_state = record["step"], checkpoints.rng_state()  # what a stop during the evaluation saves
    try:
        record |= evaluation.evaluate_if_due(model, tokenizer, eval_problems, cfg, device, step, stop.begin())
    except stops.Dropped:  # the step is saved with its record pending, evaluated on resume
        saved = save(step, rng=random_state, metrics_records=log.kept, pending=record) if step else None
        when = f"after step {step} of {cfg.steps}" if step else "before training"
        stops.exit_stopped(stop, f"during the evaluation {when}", saved, argv)
    log.append(record | devices.peak_memory(device))
    trouble, stopping = check_health(log.history), distributed.anyone(stop.requested, device) and step < cfg.steps
    if (step and due_save) or stopping or trouble:
        saved = save(step, rng=checkpoints.rng_state(), metrics_records=log.kept)
    if stopping:
        stops.exit_stopped(stop, f"after step {step} of {cfg.steps}", saved, argv)
    if trouble:
        raise SystemExit(f"{trouble} The last step's checkpoint is {saved}." if saved else 1)  # process 0 says it
    return record


def check_health(history: list[dict], patience: int = 3) -> str | None:
    """Why the run must stop, or None: `patience` steps in a row not applied (a non-finite loss or
    gradient). The first time `patience` steps in a row trained nothing, a warning says why."""
    if len(history) >= patience and all(record["skipped"] for record in history[-patience:]):
        return (f"steps {history[-patience]['step']}-{history[-1]['step']} had a non-finite loss or gradient norm, so "
                "none was applied. Likely causes: a learning rate too high (--lr), a temperature too low, or a reward "
                "that is not finite.")
    idle = [not record["skipped"] and (record["tokens"] == 0 or record["grad_norm"] == 0) for record in history]
    idle_runs = [all(idle[end - patience:end]) for end in range(patience, len(idle) + 1)]
    if idle_runs and idle_runs[-1] and idle_runs.count(True) == 1:  # the first time only
        tqdm.write(f"warning: steps {history[-patience]['step']}-{history[-1]['step']} trained nothing (no counted "
                   f"token or a zero gradient): {why_idle(history, patience)}", file=sys.stderr)  # below the bar
    return None


def why_idle(history: list[dict], patience: int) -> str:
    """What the last `patience` records, which trained nothing, say about why: read off their rewards."""
    recent, earlier = history[-patience:], history[:-patience]
    if all(record["reward"] == 0 for record in recent):
        if any(record["reward"] > 0 for record in earlier):
            return (f"no answer was rewarded, and some were before step {recent[0]['step']}: the model may have "
                    "collapsed (try a lower --lr)")
        return ("no answer was rewarded: the questions are out of the model's reach, or its answers miss the "
                "reward's format (--reward strict pays only a \\boxed{} or #### answer)")
    if all(record["reward"] == 1 for record in recent):
        return "every answer was right: the task is too easy for the model"
    return ("every sibling group agreed (all right or all wrong), so none was kept: wider groups (--branch, --width) "
            "or a higher --temperature give them more to disagree on")


def train_step(model, ref_model, tokenizer, optimizer, problems: list[dict], cfg: Config, device: str, stop=None):
    """Sample and score this process's share of the questions, then `learn` from every process's
    trees. Returns (the step's record, every tree)."""
    (rank, world), start = distributed.rank_and_world(), time.perf_counter()
    with devices.phase("sampling"):
        mine = sample_and_score(model, tokenizer, distributed.share(problems, rank, world), cfg, device, stop)
    sampled = time.perf_counter()
    record, roots = learn(model, ref_model, optimizer, mine, cfg, device, stop)
    return record | {"sample_s": sampled - start, "loss_and_update_s": time.perf_counter() - sampled}, roots


def learn(model, ref_model, optimizer, mine: list, cfg: Config, device: str, stop=None):
    """Credit every process's trees (the same advantages in each), then --updates-per-batch rounds of
    loss and update on this process's own (`mine`). Returns (the step's record, every tree)."""
    rank, world = distributed.rank_and_world()
    roots = trees = credit(distributed.gather(mine), cfg)
    model.train()  # sample_trees switched to eval mode for sampling and back
    if cfg.method == "treepo" or cfg.root_term == "treepo":  # per-leaf scores: each segment once, or each leaf's path
        trees = treepo.weighted_trees(roots) if cfg.updates_per_batch == 1 else treepo.path_trees(roots)
    my_trees, total = distributed.share(trees, rank, world), counted_tokens(trees)  # divide by the batch's count
    updates = []  # the first update's log-probs are the old ones of the later updates: its ratio is exactly 1
    while len(updates) < cfg.updates_per_batch and not (updates and updates[-1]["skipped"]):
        keep = not updates and cfg.updates_per_batch > 1
        updates.append(update(model, ref_model, optimizer, my_trees, total, cfg, device, stop, keep_logprobs=keep))
    clip_fractions = [done["clip_fraction"] for done in updates]
    return {**records.tree_metrics(roots, "treepo" if cfg.root_term == "treepo" else cfg.method), **updates[0], "clip_fraction": sum(clip_fractions) / len(updates),
            "clip_fractions": clip_fractions, "updates": len(updates), "skipped": updates[-1]["skipped"]}, roots


def update(model, ref_model, optimizer, trees, total_tokens, cfg: Config, device: str, stop=None,
           keep_logprobs=False) -> dict:
    """The loss, back-propagated (over the batch's `total_tokens`; the processes' gradients summed), and
    one AdamW step, never with a non-finite loss or gradient nor with nothing counted. A stop is taken
    before each of the loss's forwards; once the AdamW step begins the step finishes (`stop.commit()`)."""
    with devices.phase("the loss"), devices.autocast(device, cfg.dtype):
        loss, stats = backward_loss(model, trees, ref_model=ref_model, kl_coef=cfg.kl_coef, clip_eps=cfg.clip_eps,
                                    temperature=cfg.temperature, packed=LOSS_ROWS[cfg.loss_rows],
                                    max_row_tokens=cfg.max_row_tokens, micro_batch_size=cfg.micro_batch_size,
                                    total_tokens=total_tokens, keep_logprobs=keep_logprobs,
                                    should_stop=stop.should_stop if stop else None)
    distributed.sum_gradients(trainable(model))
    loss, stats = distributed.sum_loss_stats(loss, stats, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip).item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    with devices.phase("the optimizer step"):
        if stats["tokens"] and not skipped:
            stop.commit() if stop else None
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, **stats, "grad_norm": grad_norm, "skipped": skipped}


def sample_and_score(model, tokenizer, problems: list[dict], cfg: Config, device: str, stop=None):
    """Sample one tree per problem and reward its leaves; a stop ends sampling at the next token."""
    prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in problems]
    roots = []
    for start in tqdm(range(0, len(prompts), cfg.sample_batch_size), desc="sampling", leave=False):
        with devices.autocast(device, cfg.dtype):
            try:
                roots += sample(model, tokenizer, prompts[start:start + cfg.sample_batch_size], cfg,
                                stop.should_stop if stop else None)
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
            leaf.reward = gsm8k_reward(text, problem["answer"], strict=cfg.reward == "strict")
            try:  # checked where it is made, so that the error can quote the answer
                reward_of(leaf)
            except ValueError as error:
                raise SystemExit(f"the verifier's reward for the answer {text[:80]!r}: {error}")
    return roots


def credit(roots, cfg: Config):
    """Values and advantages: TreeRPO's and GRPO's within each tree, TreePO's per leaf, whitened
    over the whole batch. Returns `roots`."""
    try:
        if cfg.method == "treepo" or cfg.root_term == "treepo":
            treepo.assign_treepo_advantages(roots)
        for root in roots if cfg.method != "treepo" and cfg.root_term != "treepo" else []:
            assign_advantages(root, norm="none" if cfg.norm == "step" else cfg.norm, tau=cfg.tau,
                              root_term=None if cfg.root_term == "none" else cfg.root_term)
        if cfg.method != "treepo" and cfg.norm == "step":  # over the whole batch, every process's trees
            scale_by_step(roots)
    except ValueError as error:  # e.g. rewards so large that their mean overflows: say it in one line
        raise SystemExit(f"the advantages cannot be computed: {error}")
    return roots


def sample(model, tokenizer, prompts: list[str], cfg: Config, should_stop=None):
    """The three methods differ here (what they sample) and in the credit; the rest is shared. No
    log-probs are recorded: PPO's old ones are the first update's (`learn`)."""
    settings = dict(temperature=cfg.temperature, should_stop=should_stop)
    if cfg.method == "treepo":
        return treepo.sample_budgeted_trees(model, tokenizer, prompts, width=cfg.width, divergence=cfg.divergence,
                                            segment_tokens=cfg.segment_tokens, max_depth=cfg.depth, **settings)
    if cfg.method == "grpo":  # GRPO is a one-level tree: G answers with the tree's whole response budget
        return sample_trees(model, tokenizer, prompts, branch=cfg.width, depth=1,
                            segment_tokens=flags.answer_tokens(cfg), **settings)
    branches, segments = flags.levels(cfg)
    return sample_trees(model, tokenizer, prompts, branch=branches, depth=len(branches),
                        segment_tokens=segments, **settings)


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
        stops.say(f"\naborted. {stops.where_to_go_on(Path(cfg.out), cfg.steps, argv)}", sys.stderr)
        raise SystemExit(130)
    except OSError as error:
        if not stops.is_disk_full(error):
            raise
        raise SystemExit(f"the disk is full ({error}). Free some space; "
                         f"{stops.where_to_go_on(Path(cfg.out), cfg.steps, argv)}")


if __name__ == "__main__":
    main()
