"""The series alone on a v6.12 base ("series only"): the 85 patches of "KVM: Stop grabbing references to
PFNMAP'd pages" (merged as 5cb1659f4120) and none of the other MMU changes merged for v6.13 beside it
("[6.13-other]": "KVM: x86/mmu: Don't flush TLBs when aging SPTEs", huge pages recovered in place when
dirty logging is disabled).

So a scenario can run full v6.12 (``legacy``), the series' own effect (``series-only``) and full v6.13
(``series``) side by side; a VM of any policy created with ``v613_other`` set takes that instead.
"""

from __future__ import annotations

from kvmsim.policies.series import SeriesPolicy


class SeriesOnlyPolicy(SeriesPolicy):
    name = "series-only"
    title = "the series on v6.12: v6.13's protocol without the other 6.13 MMU changes"

    #: Not a series patch: v6.12's MMU outside the series (TLB flush on aging, zap-collapsible on disable).
    mmu_613_other = False
