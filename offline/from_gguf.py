"""A GGUF file as a plain Hugging Face model folder (used by offline/smollm2.py and offline/qwen05.py).

transformers reads a GGUF file (with the packages `gguf` and `accelerate`) and dequantizes its
weights to fp32, but refuses to `save_pretrained` a model loaded that way. Copying the weights
into a fresh model built from the same config, without the quantization note, saves a folder that
reloads bit-identically and works anywhere a model name does (`--model folder`).
"""

import importlib.util
from pathlib import Path

import torch


def missing_gguf_packages() -> list[str]:
    """The packages transformers needs to read a GGUF file that are not installed."""
    return [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


def load_gguf(gguf: Path):
    """(model in fp32, tokenizer) as transformers reads `gguf`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def plain_model(loaded, tie_head: bool | None = None):
    """A fresh model with `loaded`'s config (no quantization note) and weights. tie_head=True uses the
    input embeddings as the output head too (the loaded head is dropped); None keeps the config's tying."""
    from transformers import AutoConfig, AutoModelForCausalLM
    settings = {key: value for key, value in loaded.config.to_dict().items() if key != "quantization_config"}
    if tie_head is not None:
        settings["tie_word_embeddings"] = tie_head
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    weights = loaded.state_dict()
    if tie_head:
        weights.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tie_head else set()):
        raise RuntimeError(f"the GGUF's weights do not fit its config: missing {missing}, unexpected {unexpected}")
    if tie_head:
        model.tie_weights()  # lm_head.weight is embed_tokens.weight
    model.generation_config = loaded.generation_config
    return model


def save_folder(model, tokenizer, folder: str) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
