"""What does the tree cost, and what does KV-cache branching save? Measured side by side.

For the same prompts and the same number of leaves per prompt (branch**depth):
    (a) tree     treerpo.sample_trees: each prompt encoded once, KV cache copied to branch
    (b) reencode the same tree, but every level re-encodes each node's whole prefix (no cache reuse)
    (c) flat     GRPO: branch**depth independent responses of depth * segment_tokens tokens
and the loss step (teacher-forced forward + backward over every node of the trees).
Ideal (a)/(c) from token counts: sum_d N^d L / (N^D D L).

    python -m bench.bench                 # CPU: tiny and Qwen-size (151,936) vocabularies, N=2 and N=4, D=3
    python -m bench.bench --quick         # seconds; CI runs it
    python -m bench.bench --device cuda --model qwen2.5-0.5b   # GPU: Qwen2.5-0.5B's config, random weights
    python -m bench.bench --model out/smollm2 --prompts 4      # a real model folder (offline/smollm2.py)
    python -m bench.bench --model out/smollm2 --loss-rows      # the loss step: leaf paths vs packed rows, recipe shapes
    python -m bench.bench --model qwen2.5-0.5b --loss-memory   # its peak memory at the demo's default tree
    python -m bench.bench --model out/smollm2 --profile-sampling   # where one level of generate spends its time

The last line printed is one JSON object with every figure.
"""

import argparse
import functools
import json
import os
import statistics
import threading
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from offline.tiny import byte_tokenizer, tiny_model
from treepo import root_of, sample_budgeted_trees
from treerpo import (TreeNode, add_children, assign_advantages, backward_loss, leaves, nodes, pad_rows,
                     response_tokens, sample_trees)

PROMPTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
           "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
           "Betty is saving money for a new wallet which costs $100.",
           "James writes a 3-page letter to 2 different friends twice a week. How many pages a year?"]
QWEN_VOCAB = 151_936


def make_model(name: str, vocab_size: int, device: str):
    """'tiny': hidden 64, 2 layers. 'qwen2.5-0.5b': Qwen2.5-0.5B's config (494M), random weights.
    Anything else: a local model folder (e.g. `python -m offline.smollm2 out/smollm2`)."""
    if name == "tiny":
        return tiny_model(vocab_size, init_std=0.02).to(device)
    if name != "qwen2.5-0.5b":
        from transformers import AutoModelForCausalLM
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, tie_word_embeddings=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------
# The two baselines; (a) is treerpo.sample_trees itself


def generation_kwargs(tokenizer, max_new_tokens):
    """The sampling settings sample_trees uses, so the three methods draw the same way."""
    return dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])


@torch.no_grad()
def sample_reencoding(model, tokenizer, prompts, *, branch, depth, segment_tokens):
    """(b): the same tree, but each level's generate starts from scratch on the full prefixes."""
    roots = [treerpo_root(tokenizer, prompt) for prompt in prompts]
    frontier, eos_ids = roots, {tokenizer.eos_token_id}
    for _ in range(depth):
        parents = [node for node in frontier for _ in range(branch)]
        prefixes = [root_of(node).tokens + response_tokens(node) for node in parents]
        input_ids, attention_mask = pad_rows(prefixes, tokenizer.pad_token_id, side="left", device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             **generation_kwargs(tokenizer, segment_tokens))
        children = add_children(parents, out[:, input_ids.shape[1]:], None, eos_ids, segment_tokens)
        frontier = [child for child in children if not child.finished]
        if not frontier:
            break
    return roots


@torch.no_grad()
def sample_flat(model, tokenizer, prompts, *, samples, max_new_tokens):
    """(c): GRPO's independent samples, `samples` per prompt, in one generate call."""
    ids = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    input_ids, attention_mask = pad_rows(ids, tokenizer.pad_token_id, side="left", device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=samples,
                         **generation_kwargs(tokenizer, max_new_tokens))
    new_tokens = out[:, input_ids.shape[1]:]
    return int((new_tokens != tokenizer.pad_token_id).sum())  # tokens generated (pads after EOS excluded)


def chat(tokenizer, question):
    """The question in the tokenizer's chat template, when it has one."""
    if not tokenizer.chat_template:
        return question
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def treerpo_root(tokenizer, prompt):
    return TreeNode(tokens=tokenizer(prompt, add_special_tokens=False).input_ids)


# ----------------------------------------------------------------------------------------------
# Measuring


class PositionCounter:
    """Counts the token positions the model forwards (rows x sequence length, pads included)."""

    def __init__(self, model):
        self.positions = 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"][..., 0]
        self.positions += tokens.numel()


class PeakMemory:
    """Peak memory above the start while the block runs (peak_mb): CUDA allocations, or on the CPU
    the process's resident set, polled every millisecond from /proc (Linux); on the CPU also the
    absolute peak (peak_bytes), and past `stop_above` bytes the process ends at once (exit 3),
    saying what ran (`what`), before the kernel's out-of-memory killer picks a process. And the
    block's seconds."""

    def __init__(self, device, stop_above: float | None = None, what: str = "the block"):
        self.device, self.stop_above, self.what, self.peak_mb = device, stop_above, what, 0.0

    def __enter__(self):
        self.began = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start, self.running = rss_bytes(), True
            self.peak_bytes = self.start
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while self.running:
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self.peak_mb = (self.peak_bytes - self.start) / 2**20
            if self.stop_above is not None and self.peak_bytes > self.stop_above:
                print(f"stopped: {self.what} passed {self.stop_above / 2**30:.1f} GB resident", flush=True)
                os._exit(3)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
        self.seconds = time.perf_counter() - self.began


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(run, model, device, repeats):
    """Median wall time of `run()` over `repeats` runs after one warm-up, the positions forwarded
    and the peak memory of one run, and what `run` returned (the same seed every run)."""
    torch.manual_seed(0)
    run()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        counter = PositionCounter(model)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        counter.handle.remove()
    return {"seconds": statistics.median(times), "positions": counter.positions, "peak_mb": memory.peak_mb}, result


def tree_tokens(roots):
    return sum(len(node.tokens) for root in roots for node in nodes(root)[1:])


def bench_case(model, tokenizer, device, *, prompts, branch, depth, segment_tokens, repeats):
    shape = dict(branch=branch, depth=depth, segment_tokens=segment_tokens)
    tree, roots = measure(lambda: sample_trees(model, tokenizer, prompts, **shape), model, device, repeats)
    reencode, reroots = measure(lambda: sample_reencoding(model, tokenizer, prompts, **shape), model, device, repeats)
    flat, flat_tokens = measure(lambda: sample_flat(model, tokenizer, prompts, samples=branch ** depth,
                                                    max_new_tokens=depth * segment_tokens), model, device, repeats)
    tree["tokens"], reencode["tokens"], flat["tokens"] = tree_tokens(roots), tree_tokens(reroots), flat_tokens

    # The loss step on the tree: random 0/1 rewards, every group kept (tau=0), forward + backward.
    generator = torch.Generator().manual_seed(0)
    for root in roots:
        for leaf in leaves(root):
            leaf.reward = float(torch.randint(0, 2, (1,), generator=generator))
        assign_advantages(root, tau=0.0)

    def loss_step(packed):
        model.zero_grad(set_to_none=True)
        return backward_loss(model, roots, micro_batch_size=16, packed=packed)[1]

    loss, stats = measure(lambda: loss_step(False), model, device, repeats)
    packed, packed_stats = measure(lambda: loss_step(True), model, device, repeats)
    for figures, figures_stats in ((loss, stats), (packed, packed_stats)):
        figures["counted_tokens"] = figures_stats["tokens"]
        figures["positions_per_counted_token"] = figures_stats["positions"] / figures_stats["tokens"]

    levels = sum(branch ** d for d in range(1, depth + 1))
    return {"branch": branch, "depth": depth, "segment_tokens": segment_tokens, "prompts": len(prompts),
            "tree": tree, "reencode": reencode, "flat": flat, "loss": loss, "loss_packed": packed,
            "packed_over_leaf_paths": packed["seconds"] / loss["seconds"],
            "tree_over_reencode": tree["seconds"] / reencode["seconds"],
            "tree_over_flat": tree["seconds"] / flat["seconds"],
            "ideal_tree_over_flat": levels / (branch ** depth * depth)}


def bench_methods(model, tokenizer, device, *, prompts, branch, depth, segment_tokens, repeats):
    """GRPO, TreeRPO and TreePO sampling at the same leaf budget W = branch**depth per prompt:
    GRPO W answers of depth * segment_tokens tokens; TreeRPO the full tree; TreePO W leaves with
    divergence = branch. Tokens, leaves and seconds per prompt."""
    width = branch ** depth
    samplers = {
        "grpo": lambda: sample_trees(model, tokenizer, prompts, branch=width, depth=1,
                                     segment_tokens=depth * segment_tokens),
        "treerpo": lambda: sample_trees(model, tokenizer, prompts, branch=branch, depth=depth,
                                        segment_tokens=segment_tokens),
        "treepo": lambda: sample_budgeted_trees(model, tokenizer, prompts, width=width, divergence=branch,
                                                segment_tokens=segment_tokens, max_depth=depth),
    }
    figures = {"branch": branch, "depth": depth, "segment_tokens": segment_tokens, "prompts": len(prompts)}
    for name, sample in samplers.items():
        timing, roots = measure(sample, model, device, repeats)
        figures[name] = {**timing, "seconds_per_prompt": timing["seconds"] / len(prompts),
                         "tokens_per_prompt": tree_tokens(roots) / len(prompts),
                         "leaves_per_prompt": sum(len(leaves(root)) for root in roots) / len(prompts)}
    return figures


def bench_lora(name, tokenizer, vocab_size, device, *, prompts, rank=16):
    """Full fine-tuning vs LoRA of rank `rank` (train_gsm8k.py --lora-rank): the bytes the training
    state holds after one loss step and AdamW step (weights, gradients, AdamW moments, and the KL
    reference: a second copy for full fine-tuning, the same model with adapters off for LoRA), and
    the peak memory of that step (CUDA allocations; on the CPU the process's resident growth)."""
    import peft
    from demo.models import adapters_off
    figures = {}
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        model = make_model(name, vocab_size, device)
        if mode == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
            ref_model, ref_bytes = adapters_off(model), 0
        else:
            ref_model = make_model(name, vocab_size, device).requires_grad_(False)
            ref_bytes = sum(p.numel() * p.element_size() for p in ref_model.parameters())
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-6)
        roots = sample_trees(model, tokenizer, prompts, branch=2, depth=2, segment_tokens=8)
        for number, leaf in enumerate(leaf for root in roots for leaf in leaves(root)):
            leaf.reward = float(number % 2)
        for root in roots:
            assign_advantages(root, tau=0.0)
        model.train()
        with PeakMemory(device) as memory:
            backward_loss(model, roots, ref_model=ref_model, kl_coef=0.001)
            optimizer.step()
        tensor_bytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
        state = {"weights": tensor_bytes(model.parameters()), "gradients": tensor_bytes(p.grad for p in trainable),
                 "adamw": tensor_bytes(t for s in optimizer.state.values() for t in s.values() if t.dim()),
                 "reference": ref_bytes}
        figures[mode] = {**{f"{key}_mb": value / 2**20 for key, value in state.items()},
                         "state_mb": sum(state.values()) / 2**20, "trainable": sum(p.numel() for p in trainable),
                         "step_peak_mb": memory.peak_mb}
        del model, ref_model, optimizer
    return figures


# ----------------------------------------------------------------------------------------------
# The loss step's layouts, and where sampling spends its time


def synthetic_tree(prompt_tokens, branch, depth, segment_tokens, vocab_size, generator):
    """A full tree of random tokens with random 0/1 leaf rewards, every group kept (tau 0): the loss
    step's cost depends on the tree's shape, not on what the tokens say."""
    random_tokens = lambda count: torch.randint(vocab_size, (count,), generator=generator).tolist()  # noqa: E731
    root = TreeNode(tokens=random_tokens(prompt_tokens))
    frontier = [root]
    for level in range(1, depth + 1):
        frontier = [child for parent in frontier for child in
                    [TreeNode(tokens=random_tokens(segment_tokens), parent=parent, depth=level) for _ in range(branch)]]
        for child in frontier:
            child.parent.children.append(child)
    for leaf in leaves(root):
        leaf.reward = float(torch.randint(0, 2, (1,), generator=generator))
    assign_advantages(root, tau=0.0)
    return root


# The CPU recipe's trees (README "Does it learn?"): 8 questions of ~60 prompt tokens a step.
RECIPE_SHAPES = {"grpo, 8 answers of 40 tokens": (8, 1, 40), "treerpo, N=2 D=3 L=16": (2, 3, 16)}


def bench_loss_rows(model, device, repeats, row_limits=(256, 512, 1024, 4096)):
    """The loss step (forward + backward) on the recipe's trees: leaf-path rows (16 a forward, as the
    recipe's --micro-batch-size) against packed rows of at most each of `row_limits` tokens."""
    generator = torch.Generator().manual_seed(0)
    figures = {}
    for name, shape in RECIPE_SHAPES.items():
        roots = [synthetic_tree(60, *shape, model.config.vocab_size, generator) for _ in range(8)]
        layouts = {"leaf paths": dict(packed=False, micro_batch_size=16)}
        layouts |= {f"packed, rows <= {limit}": dict(packed=True, max_row_tokens=limit) for limit in row_limits}
        figures[name] = {}
        for layout, kwargs in layouts.items():
            def step():
                model.zero_grad(set_to_none=True)
                return backward_loss(model, roots, **kwargs)[1]
            timing, stats = measure(step, model, device, repeats)
            figures[name][layout] = {**timing, "forwards": stats["forwards"], "positions_forwarded": stats["positions"]}
        leaf_seconds = figures[name]["leaf paths"]["seconds"]
        for numbers in figures[name].values():
            numbers["over_leaf_paths"] = numbers["seconds"] / leaf_seconds
    return figures


def bench_loss_memory(model, device, prompt_tokens=100, branch=4, depth=2, segment_tokens=192):
    """Peak memory of one loss step (forward + backward, no optimizer) on one full tree of the demo's
    default shape (N=4, D=2, L=192: 20 segments, 16 leaves): leaf paths, 8 a forward (the demo's
    --micro-batch-size), against packed rows of at most 2048 and 4096 tokens."""
    root = synthetic_tree(prompt_tokens, branch, depth, segment_tokens, model.config.vocab_size,
                          torch.Generator().manual_seed(0))
    figures = {}
    layouts = {"leaf paths": dict(packed=False, micro_batch_size=8)}
    layouts |= {f"packed, rows <= {limit}": dict(packed=True, max_row_tokens=limit) for limit in (2048, 4096)}
    for layout, kwargs in layouts.items():
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            stats = backward_loss(model, [root], **kwargs)[1]
        figures[layout] = {"peak_mb": memory.peak_mb, "seconds": time.perf_counter() - start,
                           "forwards": stats["forwards"], "positions_forwarded": stats["positions"],
                           "counted_tokens": stats["tokens"]}
        model.zero_grad(set_to_none=True)
    return figures


def bench_sampling_profile(model, tokenizer, prompts, repeats):
    """One step's sampling at the recipe's size (8 questions: GRPO's 8 answers of 48 tokens, and
    TreeRPO's N=2, D=3, L=16), split into the model's forward passes, the KV-cache copies that
    branch the tree, and the rest of `generate` (drawing each token, stopping, bookkeeping)."""
    from transformers import DynamicCache
    timers = {}

    def timed(name, function):
        @functools.wraps(function)  # the same signature: treerpo.cache_argument reads it
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - start
        return wrapper
    forward, generate = model.forward, model.generate
    model.forward, model.generate = timed("forward", forward), timed("generate", generate)
    copies = {name: getattr(DynamicCache, name) for name in ("batch_repeat_interleave", "batch_select_indices")}
    for name, method in copies.items():
        setattr(DynamicCache, name, timed("cache copies", method))
    figures = {}
    try:
        for name, shape in {"grpo, 8 answers of 48 tokens": (8, 1, 48), "treerpo, N=2 D=3 L=16": (2, 3, 16)}.items():
            runs = []
            for _ in range(repeats):
                timers.clear()
                torch.manual_seed(0)
                start = time.perf_counter()
                roots = sample_trees(model, tokenizer, prompts, branch=shape[0], depth=shape[1], segment_tokens=shape[2],
                                     temperature=0.7)
                total = time.perf_counter() - start
                runs.append({"total_s": total, "forward_s": timers["forward"], "tokens": tree_tokens(roots),
                             "cache_copies_s": timers.get("cache copies", 0.0)})
            figures[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            numbers = figures[name]
            numbers["generate_other_s"] = numbers["total_s"] - numbers["forward_s"] - numbers["cache_copies_s"]
    finally:
        model.forward, model.generate = forward, generate
        for name, method in copies.items():
            setattr(DynamicCache, name, method)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small trees and one repeat: seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny, qwen2.5-0.5b (its config, random weights), or a "
                                                         "local model folder with its tokenizer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per batch (at most 4)")
    parser.add_argument("--lora", action="store_true",
                        help="instead: memory of full fine-tuning vs LoRA rank 16, one training step")
    parser.add_argument("--methods", action="store_true",
                        help="instead: GRPO, TreeRPO and TreePO sampling at the same leaf budget (N=2, D=3)")
    parser.add_argument("--loss-rows", action="store_true",
                        help="instead: the loss step on the CPU recipe's trees, leaf paths vs packed rows")
    parser.add_argument("--loss-memory", action="store_true",
                        help="instead: peak memory of the loss step at the demo's default tree (N=4, D=2, L=192)")
    parser.add_argument("--profile-sampling", action="store_true",
                        help="instead: where a step's sampling spends its time, at the CPU recipe's size")
    args = parser.parse_args()

    if args.model in ("tiny", "qwen2.5-0.5b"):
        tokenizer = byte_tokenizer()
        vocabularies = [len(tokenizer), QWEN_VOCAB] if args.model == "tiny" else [QWEN_VOCAB]
    else:  # a real model: its own tokenizer and vocabulary
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        vocabularies = [len(tokenizer)]
    shapes = [(2, 2)] if args.quick else [(2, 3), (4, 3)]
    segment_tokens = 4 if args.quick else args.segment_tokens
    repeats = 1 if args.quick else args.repeats
    prompts = PROMPTS[:2] if args.quick else PROMPTS[:args.prompts]
    if args.lora:
        prompts = [chat(tokenizer, prompt) for prompt in prompts]
        figures = bench_lora(args.model, tokenizer, vocabularies[-1], args.device, prompts=prompts)
        for mode, numbers in figures.items():
            print(f"{mode:5} state {numbers['state_mb']:8.0f} MB  (weights {numbers['weights_mb']:.0f}, gradients "
                  f"{numbers['gradients_mb']:.0f}, AdamW {numbers['adamw_mb']:.0f}, reference {numbers['reference_mb']:.0f})"
                  f"  trainable {numbers['trainable']:,}  step peak {numbers['step_peak_mb']:.0f} MB", flush=True)
        print(json.dumps({"model": args.model, "device": args.device, "lora": figures}))
        return
    if args.loss_rows or args.loss_memory:
        model = make_model(args.model, vocabularies[0], args.device).train()
        if args.loss_rows:
            figures = bench_loss_rows(model, args.device, repeats)
        else:
            figures = bench_loss_memory(model, args.device)
        for name, layouts in (figures.items() if args.loss_rows else [("demo tree", figures)]):
            for layout, numbers in layouts.items():
                print(f"{name:28} {layout:20} {numbers['seconds']:7.2f} s  peak {numbers['peak_mb']:7.0f} MB  "
                      f"{numbers['forwards']:3} forwards  {numbers['positions_forwarded']:6} positions"
                      + (f"  {numbers['over_leaf_paths']:.2f}x leaf paths" if "over_leaf_paths" in numbers else ""),
                      flush=True)
        print(json.dumps({"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
                          "loss_rows" if args.loss_rows else "loss_memory": figures}))
        return
    if args.profile_sampling:
        from reward import chat_prompt, word_problems
        model = make_model(args.model, vocabularies[0], args.device)
        prompts = [chat_prompt(tokenizer, problem["question"], "brief") for problem in word_problems("easy", "train")[:8]]
        figures = bench_sampling_profile(model, tokenizer, prompts, repeats)
        for name, numbers in figures.items():
            print(f"{name:30} {numbers['total_s']:6.2f} s: model forward {numbers['forward_s'] / numbers['total_s']:.0%}, "
                  f"cache copies {numbers['cache_copies_s'] / numbers['total_s']:.1%}, the rest of generate "
                  f"{numbers['generate_other_s'] / numbers['total_s']:.0%}; {numbers['tokens']} tokens", flush=True)
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "sampling_profile": figures}))
        return
    if args.methods:
        prompts = [chat(tokenizer, prompt) for prompt in prompts]
        model = make_model(args.model, vocabularies[0], args.device)
        figures = bench_methods(model, tokenizer, args.device, prompts=prompts, branch=2, depth=3,
                                segment_tokens=segment_tokens, repeats=repeats)
        for name in ("grpo", "treerpo", "treepo"):
            print(f"{name:8} {figures[name]['tokens_per_prompt']:7.1f} tokens, {figures[name]['leaves_per_prompt']:4.1f} "
                  f"leaves, {figures[name]['seconds_per_prompt']:.2f} s a prompt", flush=True)
        print(json.dumps({"model": args.model, "torch": torch.__version__, "methods": figures}))
        return
    results = []
    for vocab_size in vocabularies:
        model = make_model(args.model, vocab_size, args.device)
        for branch, depth in shapes:
            case = bench_case(model, tokenizer, args.device, prompts=prompts, branch=branch, depth=depth,
                              segment_tokens=segment_tokens, repeats=repeats)
            case["vocab_size"] = vocab_size
            results.append(case)
            print(f"vocab {vocab_size:>6}  N={branch} D={depth} L={segment_tokens}  "
                  f"tree {case['tree']['seconds']:.3f}s  reencode {case['reencode']['seconds']:.3f}s  "
                  f"flat {case['flat']['seconds']:.3f}s  | tree/reencode {case['tree_over_reencode']:.2f}  "
                  f"tree/flat {case['tree_over_flat']:.2f} (ideal {case['ideal_tree_over_flat']:.2f})  "
                  f"| loss {case['loss']['seconds']:.3f}s, "
                  f"{case['loss']['positions_per_counted_token']:.2f} positions a counted token; packed "
                  f"{case['loss_packed']['seconds']:.3f}s, {case['loss_packed']['positions_per_counted_token']:.2f}",
                  flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(json.dumps({"device": device_name, "model": args.model, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
