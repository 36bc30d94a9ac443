"""`rabbit doctor`'s memory line reports the host's RAM and the memory cgroup's limit, and names
the one `max_memory="auto"` plans by. The cgroup is a real v2-shaped tree pointed at through a
`/proc/self`-shaped directory, as in tests/engine/test_cgroup.py."""

from __future__ import annotations

from pathlib import Path

import psutil

from rabbitllm.doctor import check_memory

MIB = 2**20


def _v2_proc(tmp_path: Path, limit: int, current: int) -> Path:
    group = tmp_path / "unified" / "job"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{limit}\n")
    (group / "memory.current").write_text(f"{current}\n")
    (group / "memory.stat").write_text(f"anon {current}\nfile 0\n")
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/job\n")
    mount = tmp_path / "unified"
    (proc / "mountinfo").write_text(f"41 31 0:38 / {mount} rw - cgroup2 cgroup2 rw\n")
    return proc


def test_a_tight_cgroup_is_reported_and_applies(tmp_path):
    proc = _v2_proc(tmp_path, limit=1024 * MIB, current=512 * MIB)
    (finding,) = check_memory(proc)
    assert finding.topic == "ram"
    assert "memory cgroup allows 0.5 GiB" in finding.detail
    assert "host " in finding.detail and finding.detail.endswith("applies: cgroup")


def test_a_loose_cgroup_is_reported_and_the_host_applies(tmp_path):
    huge = psutil.virtual_memory().total * 4
    (finding,) = check_memory(_v2_proc(tmp_path, limit=huge, current=0))
    assert "memory cgroup allows" in finding.detail and finding.detail.endswith("applies: host")


def test_no_cgroup(tmp_path):
    (finding,) = check_memory(tmp_path / "absent")
    assert finding.detail.endswith("no memory cgroup limit; applies: host")
