"""CPU limits from cgroup files: real v1 and v2 contents written under a temp cgroup root."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.cpus import (
    affinity_cpus,
    cgroup_quota,
    cpu_limit,
    own_cgroups,
    quota_from_cfs,
    quota_from_cpu_max,
)


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text + "\n")
    return root


def _v1(root: Path, quota: str, period: str = "100000", folder: str = "cpu,cpuacct") -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / folder / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def test_v2_quota_of_two_cpus(tmp_path: Path) -> None:
    root = _v2(tmp_path, "200000 100000")
    assert cgroup_quota(root) == 2.0
    assert cpu_limit(root=root, available=16) == 2


def test_v2_max_means_no_quota(tmp_path: Path) -> None:
    root = _v2(tmp_path, "max 100000")
    assert cgroup_quota(root) is None
    assert cpu_limit(root=root, available=16) == 16


def test_fractional_quotas_round_up(tmp_path: Path) -> None:
    assert cpu_limit(root=_v2(tmp_path, "150000 100000"), available=16) == 2
    assert cpu_limit(root=_v2(tmp_path, "50000 100000"), available=16) == 1
    assert cpu_limit(root=_v2(tmp_path, "400000 100000"), available=16) == 4


def test_v1_minus_one_means_no_quota(tmp_path: Path) -> None:
    root = _v1(tmp_path, "-1")
    assert cgroup_quota(root) is None
    assert cpu_limit(root=root, available=8) == 8


def test_v1_quota(tmp_path: Path) -> None:
    root = _v1(tmp_path, "300000", "100000", folder="cpu")
    assert cgroup_quota(root) == 3.0
    assert cpu_limit(root=root, available=8) == 3


def test_v1_fractional_quota_with_a_short_period(tmp_path: Path) -> None:
    assert cpu_limit(root=_v1(tmp_path, "125000", "50000"), available=8) == 3


def test_missing_files_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path) is None
    assert cgroup_quota(tmp_path / "absent") is None
    assert cpu_limit(root=tmp_path, available=6) == 6


def test_the_quota_never_exceeds_the_affinity_mask(tmp_path: Path) -> None:
    assert cpu_limit(root=_v2(tmp_path, "800000 100000"), available=2) == 2


def test_an_explicit_limit_wins_over_the_quota(tmp_path: Path) -> None:
    root = _v2(tmp_path, "800000 100000")
    assert cpu_limit(2.5, root=root, available=16) == 3
    assert cpu_limit(32, root=root, available=16) == 16


@pytest.mark.parametrize("text", ["", "garbage", "0 100000", "-5 100000", "100000 0", "abc 100000"])
def test_unparsable_cpu_max_is_no_quota(text: str) -> None:
    assert quota_from_cpu_max(text) is None


def test_unparsable_cfs_is_no_quota() -> None:
    assert quota_from_cfs("x", "100000") is None
    assert quota_from_cfs("100000", "0") is None


def test_this_machine_has_at_least_one_cpu() -> None:
    assert affinity_cpus() >= 1
    assert cpu_limit() >= 1


def test_own_cgroups_reads_v2_and_v1_cpu_lines() -> None:
    text = "12:memory:/kubepods/pod1/c1\n4:cpu,cpuacct:/kubepods/pod1/c1\n0::/kubepods.slice/c1.scope\n"
    assert own_cgroups(text) == ("/kubepods.slice/c1.scope", "/kubepods/pod1/c1")
    assert own_cgroups("") == (None, None)
    assert own_cgroups("garbage") == (None, None)


def test_without_a_cgroup_namespace_the_quota_is_read_below_the_mount(tmp_path: Path) -> None:
    """Older runtimes show the host's hierarchy: the container's cpu.max is at its own path."""
    (tmp_path / "cpu.max").write_text("max 100000\n")
    own = tmp_path / "kubepods.slice" / "c1.scope"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("250000 100000\n")
    assert cgroup_quota(tmp_path, "0::/kubepods.slice/c1.scope\n") == 2.5
    assert cpu_limit(root=tmp_path, available=16, proc_cgroup="0::/kubepods.slice/c1.scope") == 3
    assert cgroup_quota(tmp_path, "0::/\n") is None


def test_v1_quota_below_the_mount(tmp_path: Path) -> None:
    own = tmp_path / "cpu" / "docker" / "abc"
    own.mkdir(parents=True)
    (own / "cpu.cfs_quota_us").write_text("200000\n")
    (own / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path, "3:cpu,cpuacct:/docker/abc\n") == 2.0
