"""Download the wheels the GPU machine lacks into `.whl/` (what `make gpu-wheels` runs).

The GPU machine (Python 3.12, x86_64, no network) has torch, accelerate, transformers, peft,
pyarrow, pandas and most small libraries, but not diffusers, datasets, bitsandbytes, pydantic
or the optimizers and helpers this project imports. (imagehash is left out: only prep's
`near_dup` imports it, and the check does not use it.) Its tree travels with `run`, and `.whl/`
(gitignored) travels when named in `carry`; both together must stay under 64 MiB.

`bench/gpu_check.py` installs them there with pip's resolver against what is installed
(`pip install --no-index --find-links .whl -r .whl/requirements.txt`), so a carried wheel is
used only where the machine's own copy is missing or too old, and a conflict fails at once with
pip's message instead of half-way through the check.

Versions are this machine's (the versions the tests pass with); where the GPU machine has a
package that might be too old or too new (`MACHINE_FIRST`), its own copy is kept when it fits. pyarrow (49 MB
for cp312) does not fit beside bitsandbytes (43 MB): datasets 5.2 needs pyarrow >= 24, and the
machine's own pyarrow is used. `--pyarrow` carries pyarrow instead of bitsandbytes, for a
machine whose pyarrow is older (the check then reports the NF4 steps as not run).

    python bench/gpu_wheels.py             # -> .whl/*.whl and .whl/requirements.txt
    python bench/gpu_wheels.py --pyarrow   # pyarrow instead of bitsandbytes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
CARRY_LIMIT_MIB = 64.0  # the working tree and every carried path together (the device's limit)

# distribution -> why the GPU machine needs it (its package list: .library/device/KINDS.md).
WHEELS = {
    "diffusers": "absent: the UNet, VAE, pipelines and single-file loading",
    "datasets": "absent: the prepped dataset (Arrow)",
    "bitsandbytes": "absent: NF4 bases and 8-bit AdamW (the 4 GB preset)",
    "dill": "absent: datasets' hashing",
    "multiprocess": "absent: datasets' workers",
    "fsspec": "datasets 5.2 needs <= 2026.9.0; the machine's may be newer",
    "pydantic": "absent: the config schema",
    "pydantic-core": "pydantic's compiled half, pinned to it",
    "annotated-types": "absent: pydantic",
    "typing-inspection": "absent: pydantic",
    "typing-extensions": "pydantic 2.14 needs >= 4.16",
    "orjson": "absent: captioning's JSON lines",
    "pytorch-optimizer": "absent: CAME, Lion, schedule-free AdamW",
    "prodigyopt": "absent: Prodigy",
    "peft": "the tested version (the machine's is unknown; >= 0.21 needed)",
}
# Carried in case the machine's copy is too old or too new, but the machine's is kept where it
# satisfies these (and what the other packages ask of it): requirement instead of the exact pin.
MACHINE_FIRST = {"fsspec": "fsspec", "typing-extensions": "typing-extensions>=4.16", "peft": "peft>=0.21"}
# Compiled wheels for Python 3.12 on x86_64 Linux: pip matches manylinux_2_N exactly.
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]


def version(name: str) -> str:
    """This environment's version of `name` (what the tests ran with)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{name}: not installed here, so no version to pin; install the project's venv first")


def download(name: str, pinned: str, out: Path) -> Path:
    """One wheel for CPython 3.12 on manylinux x86_64 (no dependencies), reused when present."""
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for wheel in out.glob("*.whl"):
        wheel_stem, wheel_version = wheel.name.split("-")[:2]
        if wheel_stem.lower() == stem:
            if wheel_version == pinned:
                return wheel
            wheel.unlink()  # another version: pip would see two candidates
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--dest", str(out),
               *(f"--platform={p}" for p in PLATFORMS), f"{name}=={pinned}"]
    subprocess.run(command, check=True)
    return next(w for w in out.glob("*.whl") if w.name.split("-")[0].lower() == stem)


def tree_mib() -> float:
    """Size of what `run` sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyarrow", action="store_true", help="carry pyarrow instead of bitsandbytes")
    parser.add_argument("--out", type=Path, default=WHEEL_DIR)
    args = parser.parse_args(argv)
    wheels = dict(WHEELS)
    if args.pyarrow:
        del wheels["bitsandbytes"]
        wheels["pyarrow"] = "datasets 5.2 needs >= 24"
    args.out.mkdir(exist_ok=True)
    pins = {name: version(name) for name in wheels}
    files = {name: download(name, pin, args.out) for name, pin in pins.items()}
    keep = set(files.values())
    for stale in set(args.out.glob("*.whl")) - keep:
        stale.unlink()
    # What gpu_check installs: the pins, resolved against the machine's own packages.
    requirements = [MACHINE_FIRST.get(name, f"{name}=={pin}") for name, pin in pins.items()]
    (args.out / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements), "utf-8")

    print(f"{'wheel':<60} {'MiB':>6}  why")
    for name, wheel in files.items():
        print(f"{wheel.name:<60} {wheel.stat().st_size / 2**20:>6.1f}  {wheels[name]}")
    total = sum(w.stat().st_size for w in keep) / 2**20
    tree = tree_mib()
    print(f"{'wheels':<60} {total:>6.1f}\n{'working tree':<60} {tree:>6.1f}\n{'what run sends':<60} {total + tree:>6.1f}"
          f"  (limit {CARRY_LIMIT_MIB:.0f})")
    if total + tree > CARRY_LIMIT_MIB:
        print(f"over the {CARRY_LIMIT_MIB:.0f} MiB the device takes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
