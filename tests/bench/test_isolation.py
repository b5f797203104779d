"""Model runs in a forked child: the warm-up before the timed flow never counts as the run's peak RSS."""

import os

import pytest

from kvmsim.bench import dirty_log_perf as dlp
from kvmsim.bench.dirty_log_perf import Options, run_model_isolated

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK) or not hasattr(os, "fork"),
                                reason="needs fork and /proc/self/clear_refs (Linux)")

MiB = 1 << 20


def test_warm_up_is_not_the_peak(monkeypatch):
    opts = Options(vcpu_memory=8 * MiB)
    cold = run_model_isolated(opts, "series", warm=False)
    # a 512 MiB warm-up for an 8 MiB guest: seen in the peak if the reset did not happen
    monkeypatch.setattr(dlp, "BYTES_PER_GUEST_PAGE", (512 * MiB) // (8 * MiB >> 12))
    warm = run_model_isolated(opts, "series", warm=True)
    assert warm.peak_rss_bytes < cold.peak_rss_bytes + 256 * MiB
    assert [p.counters for p in warm.phases] == [p.counters for p in cold.phases]


def test_peak_rss_reads_vmhwm():
    assert dlp.peak_rss() > 0
    assert dlp.reset_peak_rss() is True
