"""What the results were measured on: CPU, memory, the disk under the work directory, versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "rabbitllm",
    "rabbit-engine",
    "rabbit-store",
)


def machine_info(workdir: Path) -> dict:
    info: dict = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        meminfo = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
        )
        info["ram_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info.update(_disk(workdir))
    try:
        for mnt_line in Path("/proc/mounts").read_text().splitlines():
            parts = mnt_line.split()
            if len(parts) > 2 and parts[1] == "/":
                info["root_fs"] = f"{parts[0]} {parts[2]}"
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "log", "-1", "--format=%h %cd"]
            + ["--date=format:%Y-%m-%d %H:%M"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in PACKAGES:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:  # a missing package is just not listed
            pass
    return info


def _disk(workdir: Path) -> dict:
    """The block device holding the workdir: its name, readahead and I/O scheduler."""
    try:
        dev = os.stat(workdir).st_dev
        sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        disk = sys_dev if (sys_dev / "queue").exists() else sys_dev.parent
        q = disk / "queue"
        return {
            "disk": disk.name,
            "disk_rotational": (q / "rotational").read_text().strip() == "1",
            "read_ahead_kb": int((q / "read_ahead_kb").read_text()),
            "scheduler": (q / "scheduler").read_text().strip(),
        }
    except (OSError, ValueError):
        return {}
