"""The command line: a flag for each field of `train_gsm8k.Config`, read by argparse with its choices and
bounds, and the checks that protect a run, all before anything loads. Every mistake is one line."""

import argparse
import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import torch

from demo import checkpoints, distributed
from reward import SYSTEM_PROMPTS, chat_prompt, local_data_files
from treerpo import check_rows


def knob(default, help: str, choices=None, at_least=None, above=None):
    """A Config field: its default, its --help text, and the values its flag takes."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, at_least=at_least, above=above))


class OneLine(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its 30-line usage first; the message is what helps
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(config_class, smoke_defaults: dict, argv, description: str):
    """The Config from the command line; a bad flag exits here, with one line (status 2)."""
    parser = OneLine(prog="train_gsm8k.py", description=description, formatter_class=argparse.RawTextHelpFormatter)
    for knob_field in dataclasses.fields(config_class):
        flag, meta = "--" + knob_field.name.replace("_", "-"), knob_field.metadata
        if knob_field.type is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        parser.add_argument(flag, default=knob_field.default, choices=meta["choices"], type=knob_field.type,
                            help=f"{meta['help']} (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke defaults, then the command line again on top
        parser.set_defaults(**smoke_defaults)
        args = parser.parse_args(argv)
    cfg = config_class(**vars(args))
    run_file = Path(cfg.out) / "run.json"
    if cfg.smoke and not cfg.resume and (not run_file.is_file() or '"smoke": true' in run_file.read_text()):
        cfg.overwrite = True  # a smoke run starts over, but only over a smoke run (or nothing)
    problem = config_problem(cfg)
    if problem:
        parser.error(problem)
    return cfg


def config_problem(cfg) -> str | None:
    """What is wrong with `cfg`, in one line, or None. Nothing is loaded."""
    for knob_field in dataclasses.fields(cfg):  # the bounds; NaN and infinity are outside every one
        value, flag, meta = getattr(cfg, knob_field.name), "--" + knob_field.name.replace("_", "-"), knob_field.metadata
        if meta.get("at_least") is not None and not meta["at_least"] <= value < math.inf:
            return f"argument {flag}: must be >= {meta['at_least']}"
        if meta.get("above") is not None and not meta["above"] < value < math.inf:
            return f"argument {flag}: must be > {meta['above']}"
    if cfg.layout and not re.fullmatch(r"[1-9]\d*x[1-9]\d*(,[1-9]\d*x[1-9]\d*)*", cfg.layout):
        return f"--layout {cfg.layout}: not one NxL a level (each 1 or more), such as 6x128,2x256"
    if (cfg.layout or cfg.root_term != "none") and cfg.method != "treerpo":
        return f"--layout and --root-term are TreeRPO's; --method {cfg.method} has its own tree and credit"
    group, flag = (max(cfg.levels()[0]), "--branch" if not cfg.layout else "--layout") if cfg.method == "treerpo" \
        else (cfg.width, "--width")
    if group < 2:
        return f"{flag}: groups of one answer have nothing to be compared with, so nothing would train; use 2 or more"
    if cfg.device != "cpu" and not torch.cuda.is_available():
        return f"--device {cfg.device}: no CUDA GPU found (the demo is meant for one GPU); --device cpu runs on the CPU"
    if cfg.lora_rank and importlib.util.find_spec("peft") is None:
        return "--lora-rank needs peft, an optional dependency: pip install peft"
    if cfg.system_prompt not in SYSTEM_PROMPTS and len(cfg.system_prompt.split()) == 1:
        return f"--system-prompt {cfg.system_prompt}: not a preset ({', '.join(SYSTEM_PROMPTS)}), nor a sentence"
    if cfg.data.endswith((".jsonl", ".json")) and "," not in cfg.data:
        return f"--data {cfg.data}: one file, where a run needs two splits: a folder of train.jsonl and test.jsonl, " \
               "or TRAIN.jsonl,TEST.jsonl"
    for flag, name in (("--model", cfg.model), ("--data", cfg.data)):
        if looks_local(name) and "," not in name and not Path(name).exists():
            return f"{flag} {name}: no such file or folder (a hub name is namespace/name)"
    if Path(cfg.model).is_dir() and not (Path(cfg.model) / "config.json").is_file():
        return f"--model {cfg.model}: no config.json there, so it is not a model folder (save_pretrained makes one)"
    for split, path in (local_data_files(cfg.data) or {}).items():
        if not path.is_file():
            return f"--data {cfg.data}: no {split} file at {path} (GSM8K-format JSON Lines expected)"
    rows = min(cfg.sample_batch_size, cfg.prompts_per_step) * (math.prod(cfg.levels()[0]) if cfg.method == "treerpo"
                                                               else cfg.width)
    try:
        check_rows(rows, 4096, "--sample-batch-size x the answers a question")  # the sampler's own check
    except ValueError as error:
        return str(error)
    return out_problem(cfg)


def out_problem(cfg) -> str | None:
    """--out must hold no run, unless --resume (with a checkpoint to go on from) or --overwrite."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        return "--resume and --overwrite contradict each other: choose one"
    if cfg.resume:
        newest = checkpoints.newest(out)
        if newest is None:
            return f"--resume: no checkpoint in {out}; run without --resume first"
        state = checkpoints.state(newest)  # a checkpoint damaged: one line here, or as its files load
        if state["processes"] != distributed.processes():
            return (f"--resume: the run in {out} ran in {state['processes']} process(es), this is "
                    f"{distributed.processes()}: resume it with as many (each process's random state is saved)")
        if state["step"] >= cfg.steps:
            return f"--resume: the run in {out} already reached step {state['step']}; raise --steps to go on"
        return None
    if not cfg.overwrite and checkpoints.holds_run(out):
        go_on = "--resume to go on, " if checkpoints.newest(out) else ""  # records, no checkpoint: nothing to resume
        return f"--out {out} already holds a run: pass {go_on}--overwrite to start over, or another --out"
    return None


def looks_local(name: str) -> bool:
    """A path, not a hub name: it starts like one, has two '/', or its first part is a folder here."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or \
        ("/" in name and Path(name.split("/")[0]).is_dir())


def check_context(model, tokenizer, problems: list[dict], cfg):
    """Refuse in one line an answer budget past the model's context after the longest prompt."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(tokenizer(chat_prompt(tokenizer, problem["question"], cfg.system_prompt),
                                add_special_tokens=False).input_ids) for problem in problems)
    if context is not None and longest + cfg.answer_tokens() > context:
        raise SystemExit(f"{cfg.answer_tokens()} answer tokens (--depth x --segment-tokens, or --layout) after the "
                         f"longest prompt ({longest} tokens) exceed {cfg.model}'s context of {context} tokens")
