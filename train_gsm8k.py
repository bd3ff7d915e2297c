"""Train Qwen2.5-0.5B-Instruct on GSM8K with TreeRPO, on one GPU.

    python train_gsm8k.py                                     # TreeRPO: branch 4, depth 3, 128-token segments
    python train_gsm8k.py --method grpo --out out/grpo        # GRPO: 8 answers of 3 x 128 tokens, same code path
    python train_gsm8k.py --method treepo --out out/treepo    # TreePO (treepo.py): 8 leaves, dynamic branching
    python train_gsm8k.py --smoke                             # every path, offline, on the CPU, in seconds

Each step: one tree per prompt (treerpo.sample_trees) -> GSM8K reward on every leaf (reward.py) ->
values and sibling advantages -> PPO-clip loss, back-propagated -> AdamW step.
Greedy Pass@1 on a held-out slice of the GSM8K test split before training, every --eval-every
steps and at the end, scored strictly (`\\boxed{}`/`####` only) and leniently (last number too).
Writes <out>/metrics.jsonl (one JSON object per step) and <out>/checkpoint (--resume goes on from it).
Every knob is a field of Config and a flag; `--help` shows the defaults. Every flag is checked
before anything is loaded.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import numbers
import random
import shlex
import sys
import tempfile
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import run_folder
import treepo
from reward import PROBLEM_SETS, SYSTEM_PROMPTS, chat_prompt, gsm8k_reward, reference_answer, word_problems
from pictures import format_tree
from treerpo import NORMS, assign_advantages, backward_loss, leaves, nodes, response_tokens, sample_trees

METHODS = ("treerpo", "grpo", "treepo")
LOSS_ROWS = {"auto": None, "packed": True, "leaf-paths": False}  # --loss-rows -> backward_loss(packed=...)
def knob(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


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
    # the tree (SPEC §5: N=4, D=3, L=128 is 84 segments, 64 leaves, ~10.7k tokens per prompt)
    branch: int = knob(4, "treerpo: children per node (N); with --depth 1 this is GRPO's group size")
    depth: int = knob(3, "levels of segments below the prompt (D); a response is at most depth * L tokens")
    segment_tokens: int = knob(128, "tokens per segment (L)")
    width: int = knob(8, "grpo: answers per question (G); treepo: the leaf budget per question (W)")
    divergence: int = knob(2, "treepo: continuations per active path and level, budget permitting")
    temperature: float = knob(0.6, "sampling temperature (the published recipe's)")
    system_prompt: str = knob("demo", "the system message before every question: demo, brief or lines "
                                      "(train_gsm8k.SYSTEM_PROMPTS), or any text")
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
    loss_rows: str = knob("auto", "how the loss lays out the trees: packed (each segment once, under a tree mask: "
                                  "needs sdpa or eager attention), leaf-paths (one row per leaf, any attention), "
                                  "or auto (packed where the attention allows)", choices=tuple(LOSS_ROWS))
    max_row_tokens: int = knob(4096, "packed loss: tokens per row (one forward); bigger trees are split")
    micro_batch_size: int = knob(8, "leaf-paths loss: rows per forward/backward")
    lr: float = knob(1e-6, "AdamW learning rate, constant")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    grad_clip: float = knob(1.0, "gradient norm clip")
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory")
    lora_rank: int = knob(0, "train LoRA adapters of this rank instead of every weight (needs peft); "
                             "the KL reference is then the model with its adapters off. 0: full fine-tuning")
    # evaluation and bookkeeping
    eval_every: int = knob(25, "evaluate every this many steps (0: only before and after)")
    eval_size: int = knob(200, "held-out GSM8K test questions to evaluate on")
    eval_batch_size: int = knob(64, "questions per greedy generate call in evaluation")
    save_every: int = knob(50, "checkpoint every this many steps (and at the end)")
    save_trees: bool = knob(False, "write every step's trees (token ids, rewards, values, advantages) to "
                                   "<out>/trees.jsonl, a line a step, for analyses such as credit.py")
    show_tree_every: int = knob(0, "print the first tree of the step every this many steps, and save it "
                                   "to <out>/trees/step_K.txt (0: never)")
    seed: int = knob(0, "random seed (data order and sampling)")
    device: str = knob("auto", "cuda, cpu, or auto (cuda; the CPU only when asked or with --smoke)")
    resume: bool = knob(False, "continue from the newest checkpoint in --out")
    overwrite: bool = knob(False, "start over in an --out that already holds a run (its files are deleted)")
    smoke: bool = knob(False, "offline CPU run of every path: --model tiny, --data smoke, a small tree, 4 steps, "
                              "into out/smoke, starting over each time (unless --resume)")


# --smoke changes these defaults (flags given on the command line still win, --model and --data too).
SMOKE = dict(model="tiny", data="smoke", out="out/smoke", branch=2, depth=2, segment_tokens=8, steps=4, prompts_per_step=4,
             sample_batch_size=2, micro_batch_size=4, lr=3e-3, eval_every=2, eval_size=12, eval_batch_size=6,
             save_every=2, show_tree_every=2, width=4, device="cpu")

# A dozen GSM8K-style problems for --smoke, in the dataset's own format.
SMOKE_PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (2, 2), (1, 5), (3, 3), (0, 7), (5, 3), (6, 2), (4, 4), (1, 1)]
]


# ----------------------------------------------------------------------------------------------
# Data, model, prompts


def load_problems(cfg: Config, split: str) -> list[dict]:
    """GSM8K-format problems ({"question", "answer" ending in "#### <number>"}) of `split`
    ("train" or "test"): the built-in smoke set, the easy generator, local JSON Lines files, or a
    hub dataset."""
    if cfg.data == "smoke":
        return list(SMOKE_PROBLEMS)  # a copy: the caller shuffles it
    if cfg.data in PROBLEM_SETS:
        return word_problems(cfg.data, split)
    import datasets
    files = local_data_files(cfg.data)
    if files:
        if not files[split].read_text().strip():  # datasets would call it "no data", obscurely
            return check_problems([], str(files[split]))
        try:  # datasets' json builder: one JSON object per line
            problems = list(datasets.load_dataset("json", data_files={split: str(files[split])}, split=split))
        except Exception as error:  # a malformed line raises deep inside datasets: name the file
            raise SystemExit(f"could not read {files[split]}: {error}")
        return check_problems(problems, str(files[split]))
    try:
        problems = list(datasets.load_dataset(cfg.data, "main", split=split))
    except Exception as error:  # the hub raises many types: connection, missing file, auth
        raise SystemExit(f"could not load the dataset {cfg.data!r} ({type(error).__name__}: {error}).\n"
                         "It downloads from the Hugging Face hub: check the network, or set HF_HUB_OFFLINE=1 "
                         "with a cached copy, or pass --data with a local folder. --smoke runs offline.")
    return check_problems(problems, f"{cfg.data} ({split})")


def local_data_files(data: str) -> dict[str, Path] | None:
    """{"train": path, "test": path} for a local folder or a "TRAIN.jsonl,TEST.jsonl" pair; None for
    a hub dataset name."""
    if "," in data:
        train, test = data.split(",", 1)
        return {"train": Path(train), "test": Path(test)}
    if Path(data).is_dir():
        return {"train": Path(data) / "train.jsonl", "test": Path(data) / "test.jsonl"}
    return None


def check_problems(problems: list[dict], source: str) -> list[dict]:
    """Refuse data the reward cannot score, naming the file and line, before any training."""
    if not problems:
        raise SystemExit(f"{source}: no problems in this split")
    for number, problem in enumerate(problems, start=1):
        where = f"{source}: {record_place(source, number)}"
        for key in ("question", "answer"):
            if not isinstance(problem.get(key), str) or not problem[key].strip():
                raise SystemExit(f"{where}: the record has no {key!r} text (GSM8K format: "
                                 '{"question": "...", "answer": "... #### 42"})')
        if "####" not in problem["answer"] or reference_answer(problem["answer"]) is None:
            raise SystemExit(f"{where}: the answer has no final '#### <number>', so no reward can be computed")
    return problems


def record_place(source: str, number: int) -> str:
    """"line K" of the file that holds its `number`-th record (blank lines hold none), or
    "record K" for a hub dataset."""
    if not Path(source).is_file():
        return f"record {number}"
    with open(source) as file:
        nonblank = (line_number for line_number, line in enumerate(file, start=1) if line.strip())
        return f"line {next(line for count, line in enumerate(nonblank, start=1) if count == number)}"


def load_model_and_tokenizer(cfg: Config, checkpoint: str | None = None):
    """The policy in fp32 (AdamW at lr 1e-6 needs fp32 weights: bf16 would round most updates
    away); compute runs in bf16 under autocast on CUDA. `checkpoint`: a saved run to load instead.
    With --lora-rank the model comes back wrapped in LoRA adapters, the only trainable weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny import byte_tokenizer, tiny_model  # offline stand-ins, only for --model tiny
    tokenizer = byte_tokenizer() if cfg.model == "tiny" else hub_load(AutoTokenizer, cfg.model, "the tokenizer of")
    full_checkpoint = checkpoint if not cfg.lora_rank else None  # a LoRA checkpoint holds only the adapters
    if full_checkpoint:
        model = hub_load(AutoModelForCausalLM, full_checkpoint, "the model", dtype=torch.float32)
    elif cfg.model == "tiny":
        model = tiny_model(len(tokenizer), init_std=0.02, seed=cfg.seed)
    else:
        model = hub_load(AutoModelForCausalLM, cfg.model, "the model", dtype=torch.float32)
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns there
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        model = add_lora(model, cfg, checkpoint)
    return model, tokenizer


def hub_load(auto_class, name: str, what: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a name that is neither a folder nor a hub id (4.57)
        raise SystemExit(f"could not load {what} {name!r}: {error}\n"
                         "Check the name and the network, or pass --model with a local folder.")


def add_lora(model, cfg: Config, checkpoint: str | None):
    """Wrap `model` in LoRA adapters of rank --lora-rank on every linear layer but the output head
    (new ones, or those saved in `checkpoint`); only the adapters train."""
    import peft
    if cfg.gradient_checkpointing:  # frozen embeddings: the checkpointed blocks need an input with grad
        model.enable_input_require_grads()
    if checkpoint:
        return peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def adapters_off(peft_model):
    """The KL reference of a LoRA run: the same model called with its adapters disabled, which is
    the starting model, without a second copy in memory. `backward_loss` only calls it."""
    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            return peft_model(*args, **kwargs)
    return forward


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
            text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
            leaf.reward = checked_score(gsm8k_reward(text, problem["answer"], strict=cfg.strict_reward), text)
    try:
        if cfg.method == "treepo":
            treepo.assign_treepo_advantages(roots)  # per leaf, whitened over the whole batch
        else:
            for root in roots:
                assign_advantages(root, norm=cfg.norm, tau=cfg.tau)
    except ValueError as error:  # e.g. rewards so large that their mean overflows: say it in one line
        raise SystemExit(f"the advantages cannot be computed: {error}")
    return roots


def checked_score(score, response: str) -> float:
    """A verifier's score as a float: a bool, int, float or numpy scalar that is finite, else a
    one-line error quoting the response (a string or NaN would corrupt the advantages and metrics)."""
    if isinstance(score, numbers.Real) and math.isfinite(score):
        return float(score)
    raise SystemExit(f"the verifier returned {score!r} ({type(score).__name__}) for the response {response[:80]!r}: "
                     "a reward must be a finite number (bool, int, float or a numpy scalar)")


def sample(model, tokenizer, prompts: list[str], cfg: Config):
    """The three methods differ here (what they sample) and in the advantage; the rest is shared."""
    if cfg.method == "treepo":
        return treepo.sample_budgeted_trees(model, tokenizer, prompts, width=cfg.width, divergence=cfg.divergence,
                                            segment_tokens=cfg.segment_tokens, max_depth=cfg.depth,
                                            temperature=cfg.temperature)
    if cfg.method == "grpo":  # GRPO is a one-level tree: G answers with the tree's whole response budget
        return sample_trees(model, tokenizer, prompts, branch=cfg.width, depth=1,
                            segment_tokens=cfg.depth * cfg.segment_tokens, temperature=cfg.temperature)
    return sample_trees(model, tokenizer, prompts, branch=cfg.branch, depth=cfg.depth,
                        segment_tokens=cfg.segment_tokens, temperature=cfg.temperature)


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


def train_step(model, ref_model, tokenizer, optimizer, problems, cfg: Config, device: str) -> dict:
    seconds = {}
    start = time.perf_counter()
    roots = sample_and_score(model, tokenizer, problems, cfg, device)
    seconds["sample_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model.train()  # sample_trees switched to eval mode for sampling and back
    trained = treepo.weighted_trees(roots) if cfg.method == "treepo" else roots  # TreePO: per-leaf scores
    with autocast(device):
        loss, stats = backward_loss(model, trained, ref_model=ref_model, kl_coef=cfg.kl_coef, clip_eps=cfg.clip_eps,
                                    temperature=cfg.temperature, packed=LOSS_ROWS[cfg.loss_rows],
                                    max_row_tokens=cfg.max_row_tokens, micro_batch_size=cfg.micro_batch_size)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))  # never applied: the weights stay finite
    if stats["tokens"] and not skipped:  # every group pruned: no signal, and weight decay alone should not step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds["loss_and_update_s"] = time.perf_counter() - start
    return {**tree_metrics(roots, cfg.method), "loss": loss, **stats, "grad_norm": grad_norm, "skipped": skipped,
            **seconds}, roots


# ----------------------------------------------------------------------------------------------
# Evaluation: greedy Pass@1 (a tree with one branch and one level is one greedy answer)


def evaluate(model, tokenizer, problems: list[dict], cfg: Config, device: str) -> dict:
    strict = lenient = length = 0
    for start in tqdm(range(0, len(problems), cfg.eval_batch_size), desc="evaluating", leave=False):
        batch = problems[start:start + cfg.eval_batch_size]
        prompts = [chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in batch]
        with autocast(device):
            roots = sample_trees(model, tokenizer, prompts, branch=1, depth=1,
                                 segment_tokens=cfg.depth * cfg.segment_tokens, do_sample=False)
        for root, problem in zip(roots, batch):
            answer = root.children[0]
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
            strict += checked_score(gsm8k_reward(text, problem["answer"], strict=True), text)
            lenient += checked_score(gsm8k_reward(text, problem["answer"]), text)
            length += len(answer.tokens)
    n = len(problems)
    return {"eval_strict": strict / n, "eval_lenient": lenient / n, "eval_response_tokens": length / n,
            "eval_questions": n}


# ----------------------------------------------------------------------------------------------
# Checkpoints (run_folder.py makes them atomic and checks them before they are loaded)


def save_checkpoint(model, tokenizer, optimizer, step: int, records: int, cfg: Config) -> Path:
    """<out>/checkpoint-<step>: the weights (the adapters only, with --lora-rank), the tokenizer,
    the optimizer and every RNG's state, and run_state.json: the step, how many metrics records
    the run had logged, and the config. Weights that are not finite are never saved."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not all(torch.isfinite(parameter).all() for parameter in trainable):
        raise SystemExit(f"step {step}: the weights are not finite, so no checkpoint was saved (the last one remains)")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    run_state = {"step": step, "metrics_records": records, "config": dataclasses.asdict(cfg)}
    return run_folder.save_checkpoint(Path(cfg.out), step, [
        model.save_pretrained, tokenizer.save_pretrained,
        lambda folder: torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, folder / "trainer_state.pt"),
        lambda folder: (folder / "run_state.json").write_text(json.dumps(run_state))])


def load_trainer_state(folder: Path, optimizer) -> dict:
    """Restore the optimizer and every RNG from a checkpoint; returns its run_state.json."""
    try:
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        run_state = json.loads((folder / "run_state.json").read_text())
        optimizer.load_state_dict(state["optimizer"])
    except Exception as error:  # the manifest matched, so this is not damage but another script's file
        raise SystemExit(f"--resume: cannot load {folder} ({type(error).__name__}: {error}); "
                         "pass --overwrite to start over")
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return run_state


def resume_from(checkpoint: Path, optimizer, out: Path) -> tuple[int, int]:
    """Restore the optimizer and RNG from `checkpoint`, and bring metrics.jsonl (and trees.jsonl) back
    to what it had seen, moving later records aside. Returns (the step, the records kept)."""
    run_state = load_trainer_state(checkpoint, optimizer)
    records = run_folder.trim_records(out / "metrics.jsonl", run_state["metrics_records"])
    run_folder.trim_records(out / "trees.jsonl", run_state["step"])
    if records < run_state["metrics_records"]:
        tqdm.write(f"note: metrics.jsonl held {records} of the {run_state['metrics_records']} records "
                   f"{checkpoint.name} was saved after", file=sys.stderr)
    return run_state["step"], records


def resume_command(argv: list[str]) -> str:
    """The command that resumes a run: the one that started it (`argv`), with --resume."""
    return "python train_gsm8k.py " + shlex.join([arg for arg in argv if arg not in ("--resume", "--overwrite")] + ["--resume"])


# ----------------------------------------------------------------------------------------------
# Seeing what happens: one tree now and then, and the curves


def tree_record(root, problem: dict) -> dict:
    """A tree as JSON for --save-trees: the problem, and its nodes depth-first, each with the index
    of its parent (-1 for the prompt), token ids, and reward, value and advantage (null if unset)."""
    order = nodes(root)
    index = {node: number for number, node in enumerate(order)}
    return {"question": problem["question"], "answer": problem["answer"],
            "nodes": [{"parent": index.get(node.parent, -1), "tokens": node.tokens, "finished": node.finished,
                       "reward": node.reward, "value": node.value, "advantage": node.advantage} for node in order]}


def show_tree(root, tokenizer, step: int, cfg: Config):
    text = f"step {step}, first question of the batch:\n{format_tree(root, tokenizer, width=48)}\n"
    tqdm.write(text)
    folder = Path(cfg.out) / "trees"
    folder.mkdir(exist_ok=True)
    (folder / f"step_{step}.txt").write_text(text)


# ----------------------------------------------------------------------------------------------
# Main


def train(cfg: Config, argv: list[str] = ()) -> dict | None:
    """The run, from step 0 or from the newest checkpoint (--resume); returns the last record.
    argv: the command line, for the resume command a stopped run prints."""
    device = pick_device(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = run_folder.take_lock(out)  # one run per folder: before anything in it is touched
    try:
        if cfg.overwrite:
            clear_run(out)
        checkpoint = run_folder.newest_checkpoint(out) if cfg.resume else None  # checked before any loading
        return run(cfg, device, out, checkpoint, list(argv))
    finally:
        run_folder.release_lock(lock)


def clear_run(out: Path):
    """--overwrite: delete what a run writes into its folder (nothing else)."""
    for path in out.iterdir():
        if path.name.startswith((run_folder.PREFIX, "." + run_folder.PREFIX, "metrics.", "trees.", "curves.", "run.json")) \
                or path.name == "trees":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run(cfg: Config, device: str, out: Path, checkpoint: Path | None, argv: list[str]) -> dict | None:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_problems = load_problems(cfg, "train")  # data first: a bad file fails before the model loads
    random.Random(cfg.seed).shuffle(train_problems)  # one fixed order, so a resume sees the next prompts
    eval_problems = load_problems(cfg, "test")[:cfg.eval_size]

    model, tokenizer = load_model_and_tokenizer(cfg, checkpoint=str(checkpoint) if checkpoint else None)
    model.to(device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_model = reference_model(cfg, model, device)
    # after every model is built (building the tiny model reseeds torch):
    first_step, records = resume_from(checkpoint, optimizer, out) if checkpoint else (0, 0)

    (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))  # what this run is (plots.py reads it)
    started, watch, record = time.perf_counter(), RunWatch(), None
    with open(out / "metrics.jsonl", "a") as metrics_file, run_folder.GracefulStop() as stop:
        def log(record):
            metrics_file.write(run_folder.json_record(record) + "\n")
            metrics_file.flush()  # a crash or Ctrl-C keeps every finished step
        if first_step == 0:
            log(record := {"step": 0, **evaluate(model, tokenizer, eval_problems, cfg, device)})
            records += 1
        bar = tqdm(range(first_step, cfg.steps), desc="training", initial=first_step, total=cfg.steps)
        for step in range(first_step + 1, cfg.steps + 1):
            begin = (step - 1) * cfg.prompts_per_step
            problems = [train_problems[(begin + i) % len(train_problems)] for i in range(cfg.prompts_per_step)]
            record = {"step": step, **run_step(model, ref_model, tokenizer, optimizer, problems, step, cfg, device,
                                               eval_problems)}
            log(record)
            records += 1
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kept=record["kept_nodes"],
                            **({"eval": f"{record['eval_lenient']:.3f}"} if "eval_lenient" in record else {}))
            problem = watch.after(record)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested or problem:
                saved = save_checkpoint(model, tokenizer, optimizer, step, records, cfg)
            if stop.requested:
                bar.close()
                print(f"stopped by {stop.requested} after step {step} of {cfg.steps}; checkpoint in {saved}. "
                      f"Resume with: {resume_command(argv)}")
                raise SystemExit(130)
            if problem:
                raise SystemExit(f"{problem} The last step's checkpoint is {saved}.")
        bar.close()
    print(closing_line(cfg, out, first_step, time.perf_counter() - started))
    return record


class RunWatch:
    """Notices runs that have gone wrong: non-finite steps in a row stop the run; steps that train
    nothing in a row get one warning line."""

    def __init__(self, patience: int = 3):
        self.patience, self.skipped, self.idle, self.warned = patience, [], [], False

    def after(self, record: dict) -> str | None:
        """A reason to stop the run after `record`, or None."""
        self.skipped = self.skipped + [record["step"]] if record["skipped"] else []
        if len(self.skipped) >= self.patience:
            return (f"steps {self.skipped[0]}-{self.skipped[-1]} had a non-finite loss or gradient norm, so none was "
                    "applied. Likely causes: a learning rate too high (--lr), a temperature too low, or a reward that "
                    "is not finite.")
        trained_nothing = not record["skipped"] and (record["tokens"] == 0 or record["grad_norm"] == 0)
        self.idle = self.idle + [record["step"]] if trained_nothing else []
        if len(self.idle) == self.patience and not self.warned:
            self.warned = True
            tqdm.write(f"warning: steps {self.idle[0]}-{self.idle[-1]} trained nothing (no counted token or a zero "
                       "gradient): every sibling group had equal rewards. If the reward is 0 everywhere, the model may "
                       "have collapsed (try a lower --lr) or the task is out of its reach; if it is 1 everywhere, the "
                       "task is too easy.", file=sys.stderr)
        return None


def closing_line(cfg: Config, out: Path, first_step: int, seconds: float) -> str:
    """Where the results are, the held-out scores before and after, and the time taken."""
    evaluated = [record for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "eval_lenient" in record]
    scores = {kind: " -> ".join(f"{record[f'eval_{kind}']:.0%}" for record in (evaluated[0], evaluated[-1]))
              for kind in ("lenient", "strict")}
    done = f"steps {first_step + 1}-{cfg.steps}" if cfg.steps > first_step else "the evaluation only"
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    checkpoints = sorted(out.glob(f"{run_folder.PREFIX}*"))
    return (f"done: {done} in {took}; held-out Pass@1 ({evaluated[-1]['eval_questions']} questions) lenient "
            f"{scores['lenient']}, strict {scores['strict']}; metrics in {out / 'metrics.jsonl'}"
            + (f", checkpoint {checkpoints[-1]}" if checkpoints else ""))


def reference_model(cfg: Config, model, device: str):
    """The frozen starting model for the KL term: none without KL (or without steps); with LoRA the
    policy itself with its adapters off; else a second copy, from --model (the start, also after a resume)."""
    if not cfg.kl_coef or not cfg.steps:
        return None
    if cfg.lora_rank:
        return adapters_off(model)
    plain = dataclasses.replace(cfg, gradient_checkpointing=False)
    return load_model_and_tokenizer(plain)[0].to(device).eval().requires_grad_(False)


def run_step(model, ref_model, tokenizer, optimizer, problems, step: int, cfg: Config, device: str, eval_problems):
    """One training step, then whatever is due at this step: a tree shown, an evaluation."""
    metrics, roots = train_step(model, ref_model, tokenizer, optimizer, problems, cfg, device)
    if cfg.show_tree_every and step % cfg.show_tree_every == 0:
        show_tree(roots[0], tokenizer, step, cfg)
    if cfg.save_trees:
        with open(Path(cfg.out) / "trees.jsonl", "a") as file:
            file.write(json.dumps({"step": step, "trees": [tree_record(root, problem)
                                                           for root, problem in zip(roots, problems)]}) + "\n")
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
        start = time.perf_counter()
        metrics |= evaluate(model, tokenizer, eval_problems, cfg, device)
        metrics["eval_s"] = time.perf_counter() - start
    return metrics


# ----------------------------------------------------------------------------------------------
# The command line: every flag checked before anything is loaded


def parse_args(argv=None) -> tuple[Config, list[str] | None]:
    """The Config from the command line, and the folders of --plot (None when not plotting).
    A bad flag exits here, with argparse's one-line message, before any model or data is loaded."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", nargs="+", metavar="OUT_DIR",
                        help="plot the curves of these runs' metrics.jsonl into <first>/curves.png, and exit")
    for knob_field in dataclasses.fields(Config):
        flag = "--" + knob_field.name.replace("_", "-")
        help_text = f"{knob_field.metadata['help']} (default: %(default)s)"
        if knob_field.type is bool:  # every switch is off by default
            parser.add_argument(flag, action="store_true", help=knob_field.metadata["help"])
        else:
            parser.add_argument(flag, type=knob_field.type, default=knob_field.default, help=help_text,
                                choices=knob_field.metadata["choices"])
    args = parser.parse_args(argv)
    if args.smoke:  # smoke defaults, then the command line again on top
        parser.set_defaults(**SMOKE, overwrite=not args.resume)  # re-runnable as written: it starts over
        args = parser.parse_args(argv)
    plot_dirs = vars(args).pop("plot")
    cfg = Config(**vars(args))
    problem = plot_problem(plot_dirs) if plot_dirs else config_problem(cfg)
    if problem:
        parser.error(problem)  # prints usage and "error: <problem>", exits with status 2
    return cfg, plot_dirs


AT_LEAST_ONE = ("branch", "depth", "segment_tokens", "width", "divergence", "prompts_per_step", "sample_batch_size",
                "max_row_tokens", "micro_batch_size", "eval_size", "eval_batch_size", "save_every")
AT_LEAST_ZERO = ("steps", "eval_every", "show_tree_every", "lora_rank", "kl_coef", "tau", "weight_decay")
ABOVE_ZERO = ("temperature", "lr", "clip_eps", "grad_clip")


def config_problem(cfg: Config) -> str | None:
    """What is wrong with `cfg`, in one line, or None. Cheap checks only: nothing is loaded."""
    for names, test, wanted in ((AT_LEAST_ONE, lambda v: v >= 1, ">= 1"), (AT_LEAST_ZERO, lambda v: v >= 0, ">= 0"),
                                (ABOVE_ZERO, lambda v: v > 0, "> 0")):
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and test(value)):
                return f"--{name.replace('_', '-')} must be {wanted}, got {value}"
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        return "--lora-rank needs peft, an optional dependency: pip install peft"
    for flag, name in (("--model", cfg.model), ("--data", cfg.data)):
        if looks_local(name) and not Path(name).exists() and "," not in name:
            return f"{flag} {name}: no such file or folder (a hub name is namespace/name)"
    for split, path in (local_data_files(cfg.data) or {}).items():
        if not path.is_file():
            return f"--data {cfg.data}: no {split} file at {path} (GSM8K-format JSON Lines expected)"
    rows = min(cfg.sample_batch_size, cfg.prompts_per_step) * (cfg.branch ** cfg.depth if cfg.method == "treerpo" else cfg.width)
    if rows > 4096:
        return (f"a sampling call would need up to {rows:,} rows in its last level, over sample_trees' max_rows of "
                "4,096: lower --sample-batch-size or the tree (--branch, --depth, --width)")
    return out_problem(cfg)


def looks_local(name: str) -> bool:
    """A path, not a hub name: it starts like one (/ ./ ../ ~), has more than one '/', or its first
    part is a folder here (`out/smolm2`: a misspelt local folder, not the hub user "out")."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def out_problem(cfg: Config) -> str | None:
    """--out must be creatable, and must not hold another run unless --resume or --overwrite says
    what to do; a --resume checkpoint must be there (its files are checked before loading)."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        return "--resume and --overwrite contradict each other: choose one"
    if cfg.resume:
        try:
            checkpoint = run_folder.newest_checkpoint(out, hashes=False)
        except SystemExit as error:
            return str(error)
        if checkpoint is None:
            return f"--resume: no checkpoint in {out}; run without --resume first"
        step = run_folder.checkpoint_step(checkpoint)
        if step >= cfg.steps:
            return f"--resume: the run in {out} already reached step {step} of --steps {cfg.steps}; raise --steps to go on"
    elif not cfg.overwrite and (out / "metrics.jsonl").exists():
        return (f"--out {out} already holds a run (metrics.jsonl): pass --resume to continue it, "
                "--overwrite to start over, or another --out")
    return creatable_problem(out)


def creatable_problem(out: Path) -> str | None:
    """Whether `out` can be created and written, tried for real (os.access says yes to root even on
    a read-only disk): a file is made and deleted in its nearest existing folder."""
    existing = next(folder for folder in [out, *out.absolute().parents] if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"--out {out}: cannot create a folder there ({error})"
    return None


def plot_problem(plot_dirs: list[str]) -> str | None:
    missing = [folder for folder in plot_dirs if not (Path(folder) / "metrics.jsonl").is_file()]
    return f"--plot: no metrics.jsonl in {', '.join(missing)}" if missing else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, plot_dirs = parse_args(argv)
    if plot_dirs:
        import plots
        print(f"wrote {plots.plot(plot_dirs)}")
        return
    try:
        train(cfg, argv)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"\naborted. {where_to_go_on(cfg, argv)}", file=sys.stderr)
        raise SystemExit(130)
    except OSError as error:
        if not run_folder.is_disk_full(error):
            raise
        raise SystemExit(f"the disk is full ({error}). Free some space; {where_to_go_on(cfg, argv)}")
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("out of GPU memory. Lower --sample-batch-size (sampling), --max-row-tokens or "
                         "--micro-batch-size (loss) or --eval-batch-size; shrink the tree (--branch, --depth, "
                         "--segment-tokens); add --gradient-checkpointing or --lora-rank 16; or --kl-coef 0 to drop "
                         "the reference model.")


def where_to_go_on(cfg: Config, argv: list[str]) -> str:
    """The last complete checkpoint and the command that resumes from it (or starts over)."""
    checkpoints = sorted(Path(cfg.out).glob(f"{run_folder.PREFIX}*"))
    if not checkpoints:
        return f"No checkpoint was saved yet; start over with: python train_gsm8k.py {shlex.join(argv)} --overwrite"
    return f"The last complete checkpoint is {checkpoints[-1]}; resume with: {resume_command(argv)}"


if __name__ == "__main__":
    main()
