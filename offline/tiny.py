"""Offline stand-ins for the Hugging Face hub: a byte-level tokenizer and tiny random models.

The tests, `bench/bench.py` and `train_gsm8k.py --smoke` run without a network, so they build their
tokenizer and models here instead of downloading them. Nothing in `treerpo.py` depends on this
file. (A real small model without the hub: `offline/smollm2.py`.)

    >>> tok = byte_tokenizer()
    >>> model = tiny_model(len(tok), arch="qwen2")
"""

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
