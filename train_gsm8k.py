"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU.

    python train_gsm8k.py                                     # TreeRPO: branch 4, depth 3, 128-token segments
    python train_gsm8k.py --depth 1 --branch 8 --segment-tokens 384 --out out/grpo   # GRPO, same code path
    python train_gsm8k.py --smoke                             # every path, offline, on the CPU, in seconds

Each step: one tree per prompt (treerpo.sample_trees) -> GSM8K reward on every leaf (reward.py) ->
values and sibling advantages -> PPO-clip loss, back-propagated -> AdamW step.
Greedy Pass@1 on a held-out slice of the GSM8K test split before training, every --eval-every
steps and at the end, scored strictly (`\\boxed{}`/`####` only) and leniently (last number too).
Writes <out>/metrics.jsonl (one JSON object per step) and <out>/checkpoint (--resume goes on from it).
Every knob is a field of Config and a flag; `--help` shows the defaults.
"""

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from reward import gsm8k_reward
from treerpo import NORMS, assign_advantages, backward_loss, format_tree, leaves, nodes, response_tokens, sample_trees


def knob(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    model: str = knob("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face model name or local path")
    out: str = knob("out/treerpo", "folder for metrics.jsonl and the checkpoint")
    # the tree (SPEC §5: N=4, D=3, L=128 is 84 segments, 64 leaves, ~10.7k tokens per prompt)
    branch: int = knob(4, "children per node (N); with --depth 1 this is GRPO's group size")
    depth: int = knob(3, "levels of segments below the prompt (D); 1 is GRPO")
    segment_tokens: int = knob(128, "tokens per segment (L); a response is at most depth * L tokens")
    temperature: float = knob(0.6, "sampling temperature (the published recipe's)")
    # advantages and loss
    norm: str = knob("std", "advantage normalisation", choices=NORMS)
    tau: float = knob(0.1, "drop sibling groups whose values span less than this")
    clip_eps: float = knob(0.2, "PPO clip range")
    kl_coef: float = knob(0.001, "k3 KL to the starting model; 0 loads no reference copy")
    strict_reward: bool = knob(False, "reward only \\boxed{}/#### answers, not the last number")
    # optimisation
    steps: int = knob(200, "optimizer steps")
    prompts_per_step: int = knob(8, "GSM8K questions (trees) per step")
    sample_batch_size: int = knob(8, "prompts per sample_trees call (lower it to save memory)")
    micro_batch_size: int = knob(8, "leaf paths per forward/backward in the loss")
    lr: float = knob(1e-6, "AdamW learning rate, constant")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    grad_clip: float = knob(1.0, "gradient norm clip")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory")
    # evaluation and bookkeeping
    eval_every: int = knob(25, "evaluate every this many steps (0: only before and after)")
    eval_size: int = knob(200, "held-out GSM8K test questions to evaluate on")
    eval_batch_size: int = knob(64, "questions per greedy generate call in evaluation")
    save_every: int = knob(50, "checkpoint every this many steps (and at the end)")
    show_tree_every: int = knob(0, "print the first tree of the step every this many steps, and save it "
                                   "to <out>/trees/step_K.txt (0: never)")
    seed: int = knob(0, "random seed (data order and sampling)")
    device: str = knob("auto", "cuda, cpu, or auto (cuda; the CPU only when asked or with --smoke)")
    resume: bool = knob(False, "continue from <out>/checkpoint")
    smoke: bool = knob(False, "offline CPU run of every path: tiny random model, 12 built-in problems")


# --smoke changes these defaults (flags given on the command line still win).
SMOKE = dict(out="out/smoke", branch=2, depth=2, segment_tokens=8, steps=4, prompts_per_step=4,
             sample_batch_size=2, micro_batch_size=4, lr=3e-3, eval_every=2, eval_size=12, eval_batch_size=6,
             save_every=2, show_tree_every=2, device="cpu")

SYSTEM_PROMPT = ("Solve the math problem step by step. "
                 "Give the final answer as a number in \\boxed{}, for example \\boxed{42}.")

# A dozen GSM8K-style problems for --smoke, in the dataset's own format.
SMOKE_PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (2, 2), (1, 5), (3, 3), (0, 7), (5, 3), (6, 2), (4, 4), (1, 1)]
]


# ----------------------------------------------------------------------------------------------
# Data, model, prompts


def load_problems(cfg: Config, split: str) -> list[dict]:
    """GSM8K `main` questions and answers ({"question", "answer"}); the smoke set offline."""
    if cfg.smoke:
        return SMOKE_PROBLEMS
    import datasets
    try:
        return list(datasets.load_dataset("openai/gsm8k", "main", split=split))
    except Exception as error:  # the hub raises many types: connection, missing file, auth
        raise SystemExit(f"could not load the GSM8K dataset ({type(error).__name__}: {error}).\n"
                         "It downloads from the Hugging Face hub: check the network, or set HF_HUB_OFFLINE=1 "
                         "with a cached copy. --smoke runs offline.")


def load_model_and_tokenizer(cfg: Config, path: str | None = None):
    """The policy in fp32 (AdamW at lr 1e-6 needs fp32 weights: bf16 would round most updates
    away); compute runs in bf16 under autocast on CUDA. `path`: a checkpoint to load instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny import byte_tokenizer, tiny_model
    if cfg.smoke:
        tokenizer = byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except OSError as error:
            raise SystemExit(f"could not load the tokenizer of {cfg.model!r}: {error}\n"
                             "Check the name and the network, or pass --model with a local folder.")
    if cfg.smoke and path is None:
        model = tiny_model(len(tokenizer), init_std=0.02, seed=cfg.seed)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path or cfg.model, dtype=torch.float32)
        except OSError as error:
            raise SystemExit(f"could not load the model {path or cfg.model!r}: {error}\n"
                             "Check the name and the network, or pass --model with a local folder.")
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns there
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model, tokenizer


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def pick_device(cfg: Config) -> str:
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return "cuda"
    raise SystemExit("no CUDA GPU found: this demo is meant for one GPU.\n"
                     "Pass --device cpu to run on the CPU anyway (very slow), or --smoke for the offline check.")


def autocast(device: str):
    """bf16 compute on CUDA, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


# ----------------------------------------------------------------------------------------------
# One training step


def sample_and_score(model, tokenizer, problems: list[dict], cfg: Config, device: str):
    """Sample one tree per problem, reward its leaves and fill values and advantages."""
    prompts = [chat_prompt(tokenizer, problem["question"]) for problem in problems]
    roots = []
    for start in tqdm(range(0, len(prompts), cfg.sample_batch_size), desc="sampling", leave=False):
        with autocast(device):
            roots += sample_trees(model, tokenizer, prompts[start:start + cfg.sample_batch_size],
                                  branch=cfg.branch, depth=cfg.depth, segment_tokens=cfg.segment_tokens,
                                  temperature=cfg.temperature)
    for root, problem in zip(roots, problems):
        for leaf in leaves(root):
            text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
            leaf.reward = gsm8k_reward(text, problem["answer"], strict=cfg.strict_reward)
        assign_advantages(root, norm=cfg.norm, tau=cfg.tau)
    return roots


def tree_metrics(roots) -> dict:
    """What the sampled trees look like: rewards, sizes, and the failure-mode figures."""
    all_leaves = [leaf for root in roots for leaf in leaves(root)]
    groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
    return {
        "reward": sum(leaf.reward for leaf in all_leaves) / len(all_leaves),
        "solve_rate": sum(any(leaf.reward > 0 for leaf in leaves(root)) for root in roots) / len(roots),
        "leaves": len(all_leaves),
        "segments": sum(len(nodes(root)) - 1 for root in roots),
        "tokens_generated": sum(len(node.tokens) for root in roots for node in nodes(root)[1:]),
        "response_tokens": sum(len(response_tokens(leaf)) for leaf in all_leaves) / len(all_leaves),
        "truncated": sum(not leaf.finished for leaf in all_leaves) / len(all_leaves),  # no EOS by depth*L
        "pruned_groups": sum(group[0].advantage is None for group in groups) / len(groups),
    }


def train_step(model, ref_model, tokenizer, optimizer, problems, cfg: Config, device: str) -> dict:
    seconds = {}
    start = time.perf_counter()
    roots = sample_and_score(model, tokenizer, problems, cfg, device)
    seconds["sample_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model.train()  # sample_trees switched to eval mode for sampling and back
    with autocast(device):
        loss, stats = backward_loss(model, roots, ref_model=ref_model, kl_coef=cfg.kl_coef, clip_eps=cfg.clip_eps,
                                    temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    if stats["tokens"]:  # every group pruned: no signal, and AdamW's weight decay alone should not step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds["loss_and_update_s"] = time.perf_counter() - start
    return {**tree_metrics(roots), "loss": loss, **stats, "grad_norm": grad_norm, **seconds}, roots


# ----------------------------------------------------------------------------------------------
# Evaluation: greedy Pass@1 (a tree with one branch and one level is one greedy answer)


def evaluate(model, tokenizer, problems: list[dict], cfg: Config, device: str) -> dict:
    strict = lenient = length = 0
    for start in tqdm(range(0, len(problems), cfg.eval_batch_size), desc="evaluating", leave=False):
        batch = problems[start:start + cfg.eval_batch_size]
        with autocast(device):
            roots = sample_trees(model, tokenizer, [chat_prompt(tokenizer, p["question"]) for p in batch],
                                 branch=1, depth=1, segment_tokens=cfg.depth * cfg.segment_tokens, do_sample=False)
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
            strict += gsm8k_reward(text, problem["answer"], strict=True)
            lenient += gsm8k_reward(text, problem["answer"])
            length += len(answer.tokens)
    n = len(problems)
    return {"eval_strict": strict / n, "eval_lenient": lenient / n, "eval_response_tokens": length / n}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(model, tokenizer, optimizer, step: int, cfg: Config):
    folder = Path(cfg.out) / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": dataclasses.asdict(cfg)}, folder / "trainer_state.pt")


def load_checkpoint_state(cfg: Config) -> dict:
    path = Path(cfg.out) / "checkpoint" / "trainer_state.pt"
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path.parent}; run without --resume first")
    return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------------------------
# Seeing what happens: one tree now and then, and the curves


def show_tree(root, tokenizer, step: int, cfg: Config):
    text = f"step {step}, first question of the batch:\n{format_tree(root, tokenizer, width=48)}\n"
    tqdm.write(text)
    folder = Path(cfg.out) / "trees"
    folder.mkdir(exist_ok=True)
    (folder / f"step_{step}.txt").write_text(text)


CURVES = [("reward", "training reward (fraction of correct leaves)"), ("eval_lenient", "held-out Pass@1, lenient"),
          ("eval_strict", "held-out Pass@1, strict"), ("response_tokens", "mean response tokens (leaves)"),
          ("tokens_generated", "tokens generated per step"), ("sample_s", "seconds sampling per step")]


def plot(out_dirs: list[str]) -> Path:
    """Training curves of one or more runs (e.g. TreeRPO and GRPO) into <first out dir>/curves.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional dependency: pip install matplotlib")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for out_dir in out_dirs:
        records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        for axis, (key, title) in zip(axes.flat, CURVES):
            points = [(record["step"], record[key]) for record in records if key in record]
            if points:
                axis.plot(*zip(*points), marker=".", label=Path(out_dir).name)
            axis.set_title(title)
            axis.set_xlabel("step")
    axes.flat[0].legend()
    figure.tight_layout()
    path = Path(out_dirs[0]) / "curves.png"
    figure.savefig(path, dpi=80)
    return path


# ----------------------------------------------------------------------------------------------
# Main


def train(cfg: Config):
    device = pick_device(cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    state = load_checkpoint_state(cfg) if cfg.resume else None
    model, tokenizer = load_model_and_tokenizer(cfg, path=str(out / "checkpoint") if state else None)
    model.to(device)
    # The KL anchor is the *starting* model, also after a resume.
    ref_model = load_model_and_tokenizer(cfg)[0].to(device).eval().requires_grad_(False) if cfg.kl_coef else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    first_step = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        first_step = state["step"]

    train_problems = load_problems(cfg, "train")
    random.Random(cfg.seed).shuffle(train_problems)  # one fixed order, so a resume sees the next prompts
    eval_problems = load_problems(cfg, "test")[:cfg.eval_size]

    metrics_file = open(out / "metrics.jsonl", "a")

    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()  # a crash or Ctrl-C keeps every finished step
    if first_step == 0:
        log({"step": 0, **evaluate(model, tokenizer, eval_problems, cfg, device)})

    bar = tqdm(range(first_step, cfg.steps), desc="training", initial=first_step, total=cfg.steps)
    for step in bar:
        begin = step * cfg.prompts_per_step
        problems = [train_problems[(begin + i) % len(train_problems)] for i in range(cfg.prompts_per_step)]
        metrics, roots = train_step(model, ref_model, tokenizer, optimizer, problems, cfg, device)
        record = {"step": step + 1, **metrics}
        if cfg.show_tree_every and (step + 1) % cfg.show_tree_every == 0:
            show_tree(roots[0], tokenizer, step + 1, cfg)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            start = time.perf_counter()
            record |= evaluate(model, tokenizer, eval_problems, cfg, device)
            record["eval_s"] = time.perf_counter() - start
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(model, tokenizer, optimizer, step + 1, cfg)
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kept=record["kept_nodes"],
                        **({"eval": f"{record['eval_lenient']:.3f}"} if "eval_lenient" in record else {}))
    metrics_file.close()
    return record if cfg.steps > first_step else None


def parse_args(argv=None) -> tuple[Config, list[str] | None]:
    """The Config from the command line, and the folders of --plot (None when not plotting)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", nargs="+", metavar="OUT_DIR",
                        help="plot the curves of these runs' metrics.jsonl into <first>/curves.png, and exit")
    for knob_field in dataclasses.fields(Config):
        flag = "--" + knob_field.name.replace("_", "-")
        help_text = f"{knob_field.metadata['help']} (default: %(default)s)"
        if knob_field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=knob_field.default, help=help_text)
        else:
            parser.add_argument(flag, type=knob_field.type, default=knob_field.default, help=help_text,
                                choices=knob_field.metadata["choices"])
    args = parser.parse_args(argv)
    if args.smoke:  # smoke defaults, then the command line again on top
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    plot_dirs = vars(args).pop("plot")
    return Config(**vars(args)), plot_dirs


def main(argv=None):
    cfg, plot_dirs = parse_args(argv)
    if plot_dirs:
        print(f"wrote {plot(plot_dirs)}")
        return
    try:
        train(cfg)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("out of GPU memory. Lower --sample-batch-size (sampling), --micro-batch-size (loss) or "
                         "--eval-batch-size; shrink the tree (--branch, --depth, --segment-tokens); add "
                         "--gradient-checkpointing; or --kl-coef 0 to drop the reference model's copy.")


if __name__ == "__main__":
    main()
