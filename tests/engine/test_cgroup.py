"""The container memory limit behind max_memory="auto", read from cgroup files.

The hierarchies are built as real directory trees (the kernel's file formats, copied from v1 and v2
hosts) and the function is pointed at them through a `/proc/self`-shaped directory: the parsing,
the mount mapping and the ancestor walk all run as they do on a live system. A last test runs the
real thing in a v1/v2 memory cgroup when this machine lets root make one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rabbit_engine.budget import AUTO_HEADROOM, resolve_budget
from rabbit_engine.cgroup import MemoryCgroup, cgroup_available_memory, memory_cgroups

MIB = 2**20


def _proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return proc


def _v1_tree(tmp_path: Path, *, limit: int, usage: int, cache: int) -> Path:
    mount = tmp_path / "sys/memory"
    group = mount / "docker/abc"
    group.mkdir(parents=True)
    (group / "memory.stat").write_text(
        f"cache 4096\nrss 8192\nhierarchical_memory_limit {limit}\n"
        f"hierarchical_memsw_limit {limit}\n"
        f"total_cache {cache}\ntotal_rss {usage - cache}\n"
    )
    (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
    return mount


def _v1_mountinfo(mount: Path, root: str = "/") -> str:
    return (
        f"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        f"35 31 0:32 {root} {mount} rw,relatime - cgroup cgroup rw,memory\n"
        f"36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n"
    )


def test_v1_limit_minus_unreclaimable_usage(tmp_path):
    mount = _v1_tree(tmp_path, limit=1500 * MIB, usage=1000 * MIB, cache=700 * MIB)
    proc = _proc(tmp_path, "5:devices:/\n4:memory:/docker/abc\n0::/\n", _v1_mountinfo(mount))
    # page cache charged to the group is reclaimable: 1500 - (1000 - 700)
    assert cgroup_available_memory(proc) == 1200 * MIB


def test_v1_unlimited_and_namespaced_mount_root(tmp_path):
    mount = _v1_tree(tmp_path, limit=9223372036854771712, usage=10 * MIB, cache=0)
    proc = _proc(tmp_path, "4:memory:/docker/abc\n", _v1_mountinfo(mount))
    assert cgroup_available_memory(proc) is None  # no limit anywhere
    # inside a cgroup namespace, /proc/self/cgroup says "/" and the mount root is the group itself
    limited = tmp_path / "ns"
    limited.mkdir()
    group = _v1_tree(limited, limit=800 * MIB, usage=100 * MIB, cache=0) / "docker/abc"
    proc2 = _proc(limited, "4:memory:/\n", _v1_mountinfo(group, root="/docker/abc"))
    assert cgroup_available_memory(proc2) == 700 * MIB


def test_memory_cgroups_apply_the_mount_root_and_list_v1_first(tmp_path):
    """The directories the bench makes its own cgroups under: inside a cgroup namespace the v1
    mount's root is the group itself, so the path must not be appended to the mount twice."""
    mount = tmp_path / "sys/memory"
    unified = tmp_path / "unified"
    mountinfo = _v1_mountinfo(mount, root="/docker/abc") + (
        f"41 31 0:38 /sub {unified} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    proc = _proc(tmp_path, "0::/sub/job\n5:devices:/\n4:memory:/docker/abc/inner\n", mountinfo)
    assert memory_cgroups(proc) == [
        MemoryCgroup(1, mount / "inner", mount),
        MemoryCgroup(2, unified / "job", unified),
    ]
    # a path outside the mount's root (no namespace): taken relative to the mount point
    (tmp_path / "plain").mkdir()
    proc2 = _proc(tmp_path / "plain", "4:memory:/docker/abc\n", _v1_mountinfo(mount))
    assert memory_cgroups(proc2) == [MemoryCgroup(1, mount / "docker/abc", mount)]
    # a sibling whose name merely starts like the mount's root is not inside it
    (tmp_path / "sibling").mkdir()
    proc3 = _proc(
        tmp_path / "sibling", "4:memory:/docker/abcdef\n", _v1_mountinfo(mount, root="/docker/abc")
    )
    assert memory_cgroups(proc3) == [MemoryCgroup(1, mount / "docker/abcdef", mount)]
    assert memory_cgroups(tmp_path / "no-proc") == []


def _v2_level(directory: Path, limit: str, current: int, file: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.max").write_text(limit + "\n")
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.stat").write_text(f"anon {current - file}\nfile {file}\nkernel 0\n")


def test_v2_takes_the_tightest_ancestor(tmp_path):
    mount = tmp_path / "unified"
    _v2_level(mount / "user.slice", f"{4000 * MIB}", 3000 * MIB, 500 * MIB)  # 1500 left here
    _v2_level(mount / "user.slice/job", "max", 900 * MIB, 600 * MIB)  # no limit of its own
    proc = _proc(
        tmp_path,
        "0::/user.slice/job\n",
        f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    assert cgroup_available_memory(proc) == 1500 * MIB
    _v2_level(mount / "user.slice/job", f"{1000 * MIB}", 900 * MIB, 600 * MIB)  # 700 left here
    assert cgroup_available_memory(proc) == 700 * MIB


def test_no_cgroup_files_means_no_limit(tmp_path):
    proc = _proc(
        tmp_path, "0::/gone\n", f"41 31 0:38 / {tmp_path / 'absent'} rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroup_available_memory(proc) is None
    assert cgroup_available_memory(tmp_path / "no-proc") is None


def test_auto_budget_is_capped_by_a_real_memory_cgroup(tmp_path):
    """Run resolve_budget("auto") inside a 1 GiB memory cgroup: the budget must come from the
    cgroup (below 1 GiB), not from the host's free RAM. Needs root and a writable memory controller
    (as the bench's cold regime does); elsewhere the fake trees above cover the parsing."""
    v1 = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not os.access(v1, os.W_OK):
        pytest.skip("needs root and a writable cgroup-v1 memory controller")
    group = v1 / f"rabbit-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
        code = (
            "import torch; from rabbit_engine.budget import resolve_budget; "
            "print(resolve_budget('auto', torch.device('cpu')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
        )
        budget = int(out.stdout.strip().splitlines()[-1])
        assert 0 < budget < (1 << 30) * (1 - AUTO_HEADROOM)
    finally:
        group.rmdir()
    # outside the cgroup the host's figure applies again
    assert resolve_budget("auto", torch.device("cpu")) > budget
