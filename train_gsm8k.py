"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU.

    python train_gsm8k.py                                     # TreeRPO: branch 4, depth 3, 128-token segments
    python train_gsm8k.py --method grpo --out out/grpo        # GRPO: 8 answers of 3 x 128 tokens, same code path
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
    save       an atomic checkpoint every --save-every steps (run_folder.py); --resume goes on exactly
It writes <out>/metrics.jsonl, a JSON record per step, and <out>/checkpoint-<step>/. Every knob is a
field of Config and a flag; flags.py checks them all before anything is loaded.
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

import run_folder
import treepo
import flags
from flags import knob
from reward import chat_prompt, gsm8k_reward, load_problems
from treerpo import NORMS, assign_advantages, backward_loss, leaves, nodes, response_tokens, reward_of, sample_trees

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
    # the tree: N=4, D=3, L=128 is 84 segments, 64 leaves, ~10.7k generated tokens per question
    branch: int = knob(4, "treerpo: children per node (N); with --depth 1 this is GRPO's group size", at_least=1)
    depth: int = knob(3, "levels of segments below the prompt (D); a response is at most depth * L tokens", at_least=1)
    segment_tokens: int = knob(128, "tokens per segment (L)", at_least=1)
    width: int = knob(8, "grpo: answers per question (G); treepo: the leaf budget per question (W)", at_least=1)
    divergence: int = knob(2, "treepo: continuations per active path and level, budget permitting", at_least=1)
    temperature: float = knob(0.6, "sampling temperature (the published recipe's)", above=0)
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
    max_row_tokens: int = knob(4096, "packed loss: tokens per row (one forward); bigger trees are split", at_least=1)
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
    argv: the command line, for the resume command that a stopped run prints."""
    device, out = pick_device(cfg), Path(cfg.out)
    with run_folder.opened(out, overwrite=cfg.overwrite, resume=cfg.resume) as checkpoint:  # locked: one run a folder
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train_problems = load_problems(cfg.data, "train")  # data first: a bad file fails before the model loads
        random.Random(cfg.seed).shuffle(train_problems)  # one fixed order, so a resumed run sees the next ones
        eval_problems = load_problems(cfg.data, "test")[:cfg.eval_size]
        model, tokenizer = load_model_and_tokenizer(cfg, checkpoint)
        model.to(device)
        optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ref_model = reference_model(cfg, model, device)
        # after every model is built (building the tiny model reseeds torch):
        first_step, records = run_folder.resume_run(checkpoint, optimizer, out) if checkpoint else (0, 0)
        (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))  # what this run is

        started, history, record = time.perf_counter(), [], None
        with open(out / "metrics.jsonl", "a") as metrics, run_folder.GracefulStop() as stop:
            if first_step == 0:
                record = {"step": 0, **evaluate(model, tokenizer, eval_problems, cfg, device)}
                records = run_folder.append_record(metrics, record, records)
            steps = tqdm(range(first_step + 1, cfg.steps + 1), desc="training", initial=first_step, total=cfg.steps)
            for step in steps:
                problems = [train_problems[((step - 1) * cfg.prompts_per_step + i) % len(train_problems)]
                            for i in range(cfg.prompts_per_step)]
                record, roots = train_step(model, ref_model, tokenizer, optimizer, problems, cfg, device)
                record = {"step": step, **record}
                show_and_save_trees(roots, problems, tokenizer, step, cfg)
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    start = time.perf_counter()
                    record |= evaluate(model, tokenizer, eval_problems, cfg, device)
                    record["eval_s"] = time.perf_counter() - start
                records = run_folder.append_record(metrics, record, records)
                history.append(record)
                steps.set_postfix(reward=f"{record['reward']:.3f}", kept=record["kept_nodes"])
                trouble = run_folder.check_health(history)
                if step % cfg.save_every == 0 or step == cfg.steps or stop.requested or trouble:
                    saved = run_folder.save_run(out, step, model, tokenizer, optimizer, {
                        "step": step, "metrics_records": records, "config": dataclasses.asdict(cfg)})
                if stop.requested:
                    steps.close()
                    print(f"stopped by {stop.requested} after step {step} of {cfg.steps}; checkpoint in {saved}. "
                          f"Resume with: {run_folder.resume_command(argv)}")
                    raise SystemExit(130)
                if trouble:
                    raise SystemExit(f"{trouble} The last step's checkpoint is {saved}.")
        print(run_folder.closing_line(out, first_step, cfg.steps, time.perf_counter() - started)
              + (" (a smoke run: a tiny random model answers nothing; it checks that every path runs)" if cfg.smoke else ""))
        return record


def train_step(model, ref_model, tokenizer, optimizer, problems: list[dict], cfg: Config, device: str):
    """Sample, score, credit, loss, update. Returns (the step's record, the trees)."""
    start = time.perf_counter()
    roots = sample_and_score(model, tokenizer, problems, cfg, device)
    sampled = time.perf_counter()
    model.train()  # sample_trees switched to eval mode for sampling and back
    trees = treepo.weighted_trees(roots) if cfg.method == "treepo" else roots  # TreePO: per-leaf scores
    with autocast(device):
        loss, stats = backward_loss(model, trees, ref_model=ref_model, kl_coef=cfg.kl_coef, clip_eps=cfg.clip_eps,
                                    temperature=cfg.temperature, packed=LOSS_ROWS[cfg.loss_rows],
                                    max_row_tokens=cfg.max_row_tokens, micro_batch_size=cfg.micro_batch_size)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip).item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))  # never applied: the weights stay finite
    if stats["tokens"] and not skipped:  # every group pruned: no signal, and weight decay alone should not step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**tree_metrics(roots, cfg.method), "loss": loss, **stats, "grad_norm": grad_norm, "skipped": skipped,
            "sample_s": sampled - start, "loss_and_update_s": time.perf_counter() - sampled}, roots


def sample_and_score(model, tokenizer, problems: list[dict], cfg: Config, device: str):
    """Sample one tree per problem, reward its leaves, and fill values and advantages."""
    prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in problems]
    roots = []
    for start in tqdm(range(0, len(prompts), cfg.sample_batch_size), desc="sampling", leave=False):
        with autocast(device):
            try:
                roots += sample(model, tokenizer, prompts[start:start + cfg.sample_batch_size], cfg)
            except RuntimeError as error:  # torch.multinomial on NaN or infinite probabilities
                if "inf" not in str(error) and "nan" not in str(error):
                    raise
                raise SystemExit(f"sampling failed: the model's next-token probabilities are not finite ({error}); "
                                 "the weights have diverged: lower --lr (the last checkpoint holds finite weights)")
    for root, problem in zip(roots, problems):
        for leaf in leaves(root):
            leaf.reward = score(tokenizer, leaf, problem, strict=cfg.reward == "strict")
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
    """The three methods differ here (what they sample) and in the credit; the rest is shared."""
    if cfg.method == "treepo":
        return treepo.sample_budgeted_trees(model, tokenizer, prompts, width=cfg.width, divergence=cfg.divergence,
                                            segment_tokens=cfg.segment_tokens, max_depth=cfg.depth,
                                            temperature=cfg.temperature)
    if cfg.method == "grpo":  # GRPO is a one-level tree: G answers with the tree's whole response budget
        return sample_trees(model, tokenizer, prompts, branch=cfg.width, depth=1,
                            segment_tokens=cfg.depth * cfg.segment_tokens, temperature=cfg.temperature)
    return sample_trees(model, tokenizer, prompts, branch=cfg.branch, depth=cfg.depth,
                        segment_tokens=cfg.segment_tokens, temperature=cfg.temperature)


def score(tokenizer, leaf, problem: dict, strict: bool) -> float:
    """The verifier's reward for the answer ending at `leaf`, checked a finite number (reward_of) where
    it is made, so that the error can quote the answer."""
    text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
    leaf.reward = gsm8k_reward(text, problem["answer"], strict=strict)
    try:
        return reward_of(leaf)
    except ValueError as error:
        raise SystemExit(f"the verifier's reward for the answer {text[:80]!r}: {error}")


def evaluate(model, tokenizer, problems: list[dict], cfg: Config, device: str) -> dict:
    """Greedy Pass@1, strict and lenient: a tree of one branch and one level is one greedy answer."""
    strict = lenient = length = 0
    for start in tqdm(range(0, len(problems), cfg.eval_batch_size), desc="evaluating", leave=False):
        batch = problems[start:start + cfg.eval_batch_size]
        prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in batch]
        with autocast(device):
            roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1,
                                 segment_tokens=cfg.depth * cfg.segment_tokens, do_sample=False)
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            strict += score(tokenizer, answer, problem, strict=True)
            lenient += score(tokenizer, answer, problem, strict=False)
            length += len(answer.tokens)
    n = len(problems)
    return {"eval_strict": strict / n, "eval_lenient": lenient / n, "eval_response_tokens": length / n,
            "eval_questions": n}


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


# ----------------------------------------------------------------------------------------------
# The models, the device, the records


def load_model_and_tokenizer(cfg: Config, checkpoint: Path | None = None):
    """The policy in fp32 (AdamW at lr 1e-6 needs fp32 weights: bf16 would round most updates
    away); compute runs in bf16 under autocast on CUDA. `checkpoint`: a saved run to load instead.
    With --lora-rank the model comes back wrapped in LoRA adapters, the only trainable weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from offline.tiny import byte_tokenizer, tiny_model  # offline stand-ins, for --model tiny
    tokenizer = byte_tokenizer() if cfg.model == "tiny" else hub_load(AutoTokenizer, cfg.model, "the tokenizer of")
    if checkpoint and not cfg.lora_rank:  # a LoRA checkpoint holds only the adapters
        model = hub_load(AutoModelForCausalLM, str(checkpoint), "the model", dtype=torch.float32)
    elif cfg.model == "tiny":
        model = tiny_model(len(tokenizer), init_std=0.02, seed=cfg.seed)
    else:
        model = hub_load(AutoModelForCausalLM, cfg.model, "the model", dtype=torch.float32)
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns there
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        import peft
        if cfg.gradient_checkpointing:  # frozen embeddings: the checkpointed blocks need an input with grad
            model.enable_input_require_grads()
        if checkpoint:
            return peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True), tokenizer
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # not the output head
        model = peft.get_peft_model(model, config)
    return model, tokenizer


def hub_load(auto_class, name: str, what: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a name that is neither a folder nor a hub id (4.57)
        raise SystemExit(f"could not load {what} {name!r}: {str(error).splitlines()[0]} "
                         "Check the name and the network, or pass --model with a local folder.")


def reference_model(cfg: Config, model, device: str):
    """The frozen starting model for the KL term: none without KL (or without steps); with LoRA the
    policy itself with its adapters off (no second copy); else a second copy, from --model (the
    start, also after a resume)."""
    if not cfg.kl_coef or not cfg.steps:
        return None
    if cfg.lora_rank:
        return adapters_off(model)
    plain = dataclasses.replace(cfg, gradient_checkpointing=False)
    return load_model_and_tokenizer(plain)[0].to(device).eval().requires_grad_(False)


def adapters_off(peft_model):
    """The KL reference of a LoRA run: the policy called with its adapters disabled, which is the
    starting model, without a second copy in memory. backward_loss calls it and reads its config."""
    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            return peft_model(*args, **kwargs)
    forward.config = peft_model.config
    return forward


def trainable(model) -> list:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def pick_device(cfg: Config) -> str:
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return "cuda"
    raise SystemExit("no CUDA GPU found: this demo is meant for one GPU. Pass --device cpu to run on the CPU "
                     "anyway (README: a CPU run), or --smoke for the offline check.")


def autocast(device: str):
    """bf16 compute on CUDA, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def show_and_save_trees(roots, problems: list[dict], tokenizer, step: int, cfg: Config):
    """--show-tree-every: print the first tree and keep it in <out>/trees/step_K.txt. --save-trees:
    every tree as JSON in <out>/trees.jsonl."""
    if cfg.show_tree_every and step % cfg.show_tree_every == 0:
        from pictures.tree_text import format_tree
        text = f"step {step}, first question of the batch:\n{format_tree(roots[0], tokenizer, width=48)}\n"
        tqdm.write(text)
        (Path(cfg.out) / "trees").mkdir(exist_ok=True)
        (Path(cfg.out) / "trees" / f"step_{step}.txt").write_text(text)
    if cfg.save_trees:
        run_folder.append_trees(Path(cfg.out) / "trees.jsonl", step, roots, problems)


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
        print(f"\naborted. {run_folder.where_to_go_on(Path(cfg.out), argv)}", file=sys.stderr)
        raise SystemExit(130)
    except OSError as error:
        if not run_folder.is_disk_full(error):
            raise
        raise SystemExit(f"the disk is full ({error}). Free some space; {run_folder.where_to_go_on(Path(cfg.out), argv)}")
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("out of GPU memory. Lower --sample-batch-size (sampling), --max-row-tokens or "
                         "--micro-batch-size (loss) or --eval-batch-size; shrink the tree (--branch, --depth, "
                         "--segment-tokens); add --gradient-checkpointing or --lora-rank 16; or --kl-coef 0 to drop "
                         "the reference model.")


if __name__ == "__main__":
    main()
