"""Availability (KVMSIM_REAL_KVM), the policy decision, and the dmesg watcher's filtering."""

from __future__ import annotations

import pytest

from kvmsim.backend import availability
from kvmsim.backend.kvm import caps, dmesg
from kvmsim.errors import UsageError


def test_env_zero_disables(monkeypatch):
    monkeypatch.setenv("KVMSIM_REAL_KVM", "0")
    ok, reason = availability.kvm_available()
    assert not ok and "KVMSIM_REAL_KVM=0" in reason
    assert availability.real_kvm_mode() == "off"


def test_env_modes(monkeypatch):
    monkeypatch.delenv("KVMSIM_REAL_KVM", raising=False)
    assert availability.real_kvm_mode() == "auto"
    monkeypatch.setenv("KVMSIM_REAL_KVM", "1")
    assert availability.real_kvm_mode() == "force"


def test_absent_device_is_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMSIM_REAL_KVM", raising=False)
    ok, reason = availability.kvm_available(str(tmp_path / "nokvm"))
    assert not ok and "absent" in reason


def test_non_kvm_device_is_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("KVMSIM_REAL_KVM", raising=False)
    f = tmp_path / "plain"
    f.write_text("")
    ok, reason = availability.kvm_available(str(f))
    assert not ok and "KVM_GET_API_VERSION" in reason


@pytest.mark.parametrize("release,policy", [
    ("6.12.9", "legacy"), ("6.13.0", "series"), ("6.18.44-fc-v669", "series"), ("5.15.0-91-generic", "legacy"),
    ("7.0", "series"),
])
def test_policy_from_release(release, policy):
    assert caps.host_policy(release) == policy


def test_policy_override_wins_and_is_checked():
    assert caps.host_policy("6.18", override="legacy") == "legacy"
    with pytest.raises(UsageError, match="legacy, series"):
        caps.host_policy("6.18", override="newest")
    with pytest.raises(UsageError):
        caps.host_policy("not-a-kernel")


def test_selected_sysfs_choice():
    assert caps.selected("always [madvise] never") == "madvise"
    assert caps.selected("64") == "64"


def test_dmesg_reports_only_new_kvm_warnings(monkeypatch):
    log = [(1, "old line", 6), (2, "WARNING: CPU: 0 PID: 1 at virt/kvm/dirty_ring.c:80 kvm_dirty_ring_push", 4)]
    monkeypatch.setattr(dmesg, "read_kmsg", lambda: list(log))
    w = dmesg.DmesgWatch()
    assert w.last_seq == 2 and w.new_problems() == []
    log += [(3, "WARNING: CPU: 1 PID: 9 at mm/page_alloc.c:1 foo", 4), (4, "Call Trace:", 4),
            (5, " foo+0x1/0x2", 4), (6, "kvm-pvm: loaded (native=1 ...)", 6)]
    assert w.new_problems() == []                 # not KVM's; an info line naming kvm is no problem
    assert w.new_problems(kvm_only=False) == [log[2][1]]
    log += [(7, "WARNING: CPU: 1 PID: 9 at mm/gup.c:1 __get_user_pages", 4), (8, "Call Trace:", 4),
            (9, " kvm_gpc_refresh+0x10/0x20 [kvm]", 4), (10, "KVM: debugfs: duplicate directory 7-4", 4)]
    assert w.new_problems() == [log[6][1], log[9][1]]   # a KVM frame in its trace; a KVM warning line
