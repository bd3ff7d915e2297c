"""The demo's own loop (train_gsm8k.main) for a few steps, each phase measured at every call: what
bench/rehearse.py and bench/gpu_check.py report. Nothing is saved (no checkpoint), and the run's records
come back.

    records, phases = run_steps(flags, measure)   # phases[name]: the last call's figures (a later step's)
"""

import copy
import json
import random
import tempfile
from pathlib import Path

import torch

import train_gsm8k
from demo import checkpoints, models


def run_steps(flags: list[str], measure, model_and_tokenizer=None, coin_rewards: bool = False, trees: bool = False):
    """Run `python train_gsm8k.py FLAGS` in this process: `measure(name, function)` wraps sampling, the
    loss, the optimizer step and the evaluation. model_and_tokenizer: an in-memory model to train
    instead of --model's (its KL reference a frozen copy). coin_rewards: a seeded coin flip for each
    leaf's reward (random weights never answer right). Returns (metrics.jsonl's records, phases), and with
    `trees` (and --save-trees among the flags) trees.jsonl's records too."""
    phases, coin = {}, random.Random(0)
    patches = [(train_gsm8k, "sample"), (train_gsm8k, "backward_loss"), (train_gsm8k, "evaluate"),
               (torch.optim.AdamW, "step"), (checkpoints, "save"), (train_gsm8k, "gsm8k_reward"), (models, "load"),
               (models, "reference_model")]
    originals = {patch: getattr(*patch) for patch in patches}
    for (owner, name), phase in zip(patches, ("sampling", "loss", "evaluation", "optimizer step")):
        setattr(owner, name, measure(phase, getattr(owner, name), phases))
    checkpoints.save = lambda *args, **kwargs: None
    if coin_rewards:
        train_gsm8k.gsm8k_reward = lambda text, answer, strict=False: float(coin.random() < 0.5)
    if model_and_tokenizer:
        models.load = lambda cfg, checkpoint=None: model_and_tokenizer
        models.reference_model = lambda cfg, model, device: copy.deepcopy(model).eval().requires_grad_(False) \
            if cfg.kl_coef else None
    try:
        with tempfile.TemporaryDirectory() as out:
            train_gsm8k.main([*flags, "--out", str(Path(out) / "run")])
            records, saved = ([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
                              for path in (Path(out) / "run" / "metrics.jsonl", Path(out) / "run" / "trees.jsonl"))
    finally:  # train_gsm8k, torch and demo as they were
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
    return (records, phases, saved) if trees else (records, phases)
