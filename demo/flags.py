"""The demo's command line: a flag for every field of `train_gsm8k.Config`, each checked before
anything is loaded, so that a mistake costs a second, not a model load.

Every refusal is one line (`--help` lists the flags): a number out of range, a local path that does
not exist, a tree too big to sample, an --out that cannot be written or that holds another run.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import socket
import sys
import tempfile
import urllib.parse
from pathlib import Path

from demo import checkpoints, device, distributed
from reward import SYSTEM_PROMPTS, chat_prompt, local_data_files
from treerpo import check_rows


def knob(default, help: str, choices=None, at_least=None, above=None):
    """A Config field: its default, its --help text, and the values its flag takes."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, at_least=at_least, above=above))


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its 20-line usage first; the message is what helps
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(config_class, smoke_defaults: dict, argv, description: str):
    """The config from the command line, and the folders of --plot (None when not plotting).
    A bad flag exits here with one line (status 2), before any model or data is loaded.
    (transformers.HfArgumentParser reads a dataclass too, but lists every flag twice, --lora_rank
    and --lora-rank, and makes each switch take a value: --smoke [SMOKE].)"""
    parser = OneLineErrors(prog="train_gsm8k.py", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", nargs="+", metavar="OUT_DIR",
                        help="plot the curves of these runs' metrics.jsonl into <first>/curves.png, and exit")
    for knob_field in dataclasses.fields(config_class):
        flag, meta = "--" + knob_field.name.replace("_", "-"), knob_field.metadata
        if knob_field.type is bool:  # every switch is off by default
            parser.add_argument(flag, action="store_true", help=meta["help"])
        else:
            parser.add_argument(flag, type=knob_field.type, default=knob_field.default, choices=meta["choices"],
                                help=f"{meta['help']} (default: %(default)s)")
    argv = negative_numbers_joined(argv)
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke defaults, then the command line again on top
        parser.set_defaults(**smoke_defaults)
        args = parser.parse_args(argv)
    plot_dirs = vars(args).pop("plot")
    cfg = config_class(**vars(args))
    if cfg.smoke and not cfg.resume:  # re-runnable as written: it starts over, but only over a smoke run
        cfg.overwrite = cfg.overwrite or holds_smoke_run(Path(cfg.out))
    problem = plot_problem(plot_dirs) if plot_dirs else config_problem(config_class, cfg)
    if problem:
        parser.error(problem)
    return cfg, plot_dirs


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def negative_numbers_joined(argv) -> list[str]:
    """`--lr -1e-5` as `--lr=-1e-5`: argparse takes "-1e-5" for a flag (its negative numbers are
    only -1 and -1.5), so the flag would get argparse's "expected one argument" instead of its rule."""
    joined = []
    for arg in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and NEGATIVE_NUMBER.fullmatch(arg):
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    return joined


def config_problem(config_class, cfg) -> str | None:
    """What is wrong with `cfg`, in one line, or None. Cheap checks only: nothing is loaded."""
    for knob_field in dataclasses.fields(config_class):
        value, low, above = getattr(cfg, knob_field.name), knob_field.metadata["at_least"], knob_field.metadata["above"]
        if (low is not None and not (math.isfinite(value) and value >= low)) or \
                (above is not None and not (math.isfinite(value) and value > above)):
            wanted = f">= {low}" if low is not None else f"> {above}"
            return f"--{knob_field.name.replace('_', '-')} must be {wanted}, got {value}"
    if cfg.root_term != "none" and cfg.method != "treerpo":
        return f"--root-term is a TreeRPO tree's credit; --method {cfg.method} has its own"
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        return "--lora-rank needs peft, an optional dependency: pip install peft"
    problem = (device.device_problem(cfg.device) or group_problem(cfg) or model_problem(cfg.model) or
               data_problem(cfg.data) or system_prompt_problem(cfg.system_prompt))
    if problem:
        return problem
    if cfg.prompts_per_step < distributed.processes():
        return (f"--prompts-per-step {cfg.prompts_per_step} is the whole step's: give each of the "
                f"{distributed.processes()} processes at least one question")
    problem = hub_problem(cfg)
    if problem:
        return problem
    prompts = min(cfg.sample_batch_size, cfg.prompts_per_step)
    per_prompt = math.prod(levels(cfg)[0]) if cfg.method == "treerpo" else cfg.width
    try:  # the sampler's own check, before the model is loaded
        check_rows(prompts * per_prompt, 4096, f"--sample-batch-size {prompts} x {per_prompt} answers a question")
    except ValueError as error:
        return f"{error} (--branch, --depth, --layout, --width)"
    return out_problem(cfg)


LAYOUT = re.compile(r"\d+x\d+(,\d+x\d+)*")


def levels(cfg) -> tuple[list[int], list[int]]:
    """The tree's children a node and tokens a segment, one of each a level: --layout's, or
    --branch and --segment-tokens at each of --depth levels."""
    if not cfg.layout:
        return [cfg.branch] * cfg.depth, [cfg.segment_tokens] * cfg.depth
    return parse_layout(cfg.layout)


def parse_layout(text: str) -> tuple[list[int], list[int]]:
    """'4x96,4x288' -> ([4, 4], [96, 288]): children a node and tokens a segment, one pair a level."""
    pairs = [level.split("x") for level in text.split(",")]
    return [int(branch) for branch, _ in pairs], [int(tokens) for _, tokens in pairs]


def answer_tokens(cfg) -> int:
    """The answer budget: a leaf's tokens at most, GRPO's answers' and the evaluation's length."""
    return sum(levels(cfg)[1])


def layout_problem(cfg) -> str | None:
    if not cfg.layout:
        return None
    if not LAYOUT.fullmatch(cfg.layout):
        return f"--layout {cfg.layout}: not one NxL a level, such as 6x128,2x256"
    if cfg.method != "treerpo":
        return f"--layout is a TreeRPO tree's; --method {cfg.method} takes --width, --depth and --segment-tokens"
    if min(min(pair) for pair in zip(*levels(cfg))) < 1:
        return f"--layout {cfg.layout}: every count must be 1 or more"
    return None


def group_problem(cfg) -> str | None:
    """A group of one answer has no siblings to compare with: every advantage would be 0."""
    if cfg.layout:  # a level of one child is only a longer segment; some level must branch
        problem = layout_problem(cfg)
        if problem or max(levels(cfg)[0]) >= 2:
            return problem
        return f"--layout {cfg.layout}: no level has 2 or more children, so no group has siblings to compare with"
    flag, size = ("--branch", cfg.branch) if cfg.method == "treerpo" else ("--width", cfg.width)
    if size < 2:
        return (f"{flag} {size} with --method {cfg.method}: one answer per group has nothing to be compared with, "
                f"so nothing would be trained; use {flag} 2 or more")
    return None


def system_prompt_problem(system_prompt: str) -> str | None:
    """One word that is no preset is a misspelt preset (`breif`), not a system message: refused."""
    if system_prompt in SYSTEM_PROMPTS or len(system_prompt.split()) > 1:
        return None
    return (f"--system-prompt {system_prompt}: not a preset ({', '.join(SYSTEM_PROMPTS)}); a system message of "
            "your own is text of more than one word")


def first_questions(problems: list[dict], size: int, say: bool) -> list[dict]:
    """The first `size` test questions; where the split has fewer, all of them, and (say) a note."""
    if say and size > len(problems):
        print(f"note: --eval-size {size}: the test split has {len(problems)} questions, all evaluated", file=sys.stderr)
    return problems[:size]


def check_context(model, tokenizer, problems: list[dict], cfg):
    """Refuse in one line answers that cannot fit the model's context after the run's longest prompt,
    once the tokenizer and config are known (sample_trees would refuse the first batch that holds it)."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(tokenizer(chat_prompt(tokenizer, problem["question"], cfg.system_prompt),
                                add_special_tokens=False).input_ids) for problem in problems)
    if context is None or longest + answer_tokens(cfg) <= context:
        return
    budget = f"--layout {cfg.layout}" if cfg.layout else f"--depth {cfg.depth} x --segment-tokens {cfg.segment_tokens}"
    raise SystemExit(f"{budget} = {answer_tokens(cfg)} answer "
                     f"tokens after the longest prompt ({longest} tokens) exceed {cfg.model}'s context of {context} "
                     "tokens: lower --segment-tokens or --depth")


def model_problem(model: str) -> str | None:
    """--model: a local name that does not exist, or a local file or folder that holds no model."""
    path = Path(model)
    if looks_local(model) and not path.exists():
        return f"--model {model}: no such file or folder (a hub name is namespace/name)"
    if model != "tiny" and path.is_file():
        return f"--model {model} is a file: pass the folder that holds the model (config.json, weights, tokenizer)"
    if model != "tiny" and path.is_dir() and not (path / "config.json").is_file():
        return (f"--model {model}: this folder holds no config.json, so it is not a model folder (save_pretrained "
                "writes one; python -m offline.qwen05 FOLDER or offline.smollm2 FOLDER make one offline)")
    return None


def data_problem(data: str) -> str | None:
    """--data: a local name that does not exist, one file where two splits are needed, a missing split."""
    if data.endswith((".jsonl", ".json")) and "," not in data:
        if not Path(data).exists():
            return f"--data {data}: no such file"
        return (f"--data {data} is one file, and the demo needs a train and a test split: pass a folder holding "
                "train.jsonl and test.jsonl, or two files as TRAIN.jsonl,TEST.jsonl")
    if looks_local(data) and not Path(data).exists() and "," not in data:
        return f"--data {data}: no such file or folder (a hub name is namespace/name)"
    for split, path in (local_data_files(data) or {}).items():
        if not path.is_file():
            return f"--data {data}: no {split} file at {path} (GSM8K-format JSON Lines expected)"
    return None


def looks_local(name: str) -> bool:
    """A path, not a hub name: it starts like one (/ ./ ../ ~), has more than one '/', or its first
    part is a folder here (`out/smolm2`: a misspelt local folder, not the hub user "out")."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def hub_problem(cfg, timeout: float = 5.0) -> str | None:
    """One short attempt to reach the Hugging Face hub, where --model or --data names something to
    download (not a local path, nor a model in the local cache): without it, a machine with no
    network spends a minute on the hub client's retries before its error. HF_HUB_OFFLINE=1 (use
    the cache only) skips the attempt."""
    from huggingface_hub import constants, try_to_load_from_cache
    model_cached = cfg.model == "tiny" or Path(cfg.model).exists() or cached(try_to_load_from_cache, cfg.model)
    data_local = cfg.data in ("smoke", "easy", "steps") or local_data_files(cfg.data) is not None
    if constants.HF_HUB_OFFLINE or (model_cached and data_local):
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
        return None
    except OSError as error:
        flag, name = ("--model", cfg.model) if not model_cached else ("--data", cfg.data)
        return (f"{flag} {name}: the Hugging Face hub ({host.hostname}) cannot be reached ({error}); check the "
                "network, pass a local folder, or set HF_HUB_OFFLINE=1 to load a cached copy")


def cached(try_to_load_from_cache, name: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub name either
        return False


def holds_smoke_run(out: Path) -> bool:
    """Whether `out` holds no run, or only a --smoke run (its run.json says so)."""
    if not (out / "metrics.jsonl").exists():
        return True
    try:
        return json.loads((out / "run.json").read_text()).get("smoke") is True
    except (OSError, ValueError, AttributeError):
        return False


def out_problem(cfg) -> str | None:
    """--out must be creatable, and must not hold another run unless --resume or --overwrite says
    what to do; a --resume checkpoint must be there (its files are checked before loading)."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        return "--resume and --overwrite contradict each other: choose one"
    if cfg.resume:
        try:
            checkpoint = checkpoints.newest_checkpoint(out, hashes=False)
        except SystemExit as error:
            return str(error)
        if checkpoint is None:
            return f"--resume: no checkpoint in {out}; run without --resume first"
        step, processes = checkpoints.checkpoint_step(checkpoint), checkpoints.checkpoint_processes(checkpoint)
        if processes != distributed.processes():
            return (f"--resume: the run in {out} ran in {processes} process(es), this is {distributed.processes()}: "
                    "resume it with as many (each process's random state is in the checkpoint)")
        if step > cfg.steps or (step == cfg.steps and not checkpoints.checkpoint_pending(checkpoint)):
            return f"--resume: the run in {out} already reached step {step} of --steps {cfg.steps}; raise --steps to go on"
    elif not cfg.overwrite and (out / "metrics.jsonl").exists():
        return (f"--out {out} already holds a run (metrics.jsonl): pass --resume to continue it, "
                "--overwrite to delete it and start over, or another --out")
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
