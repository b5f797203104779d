"""kvmsim.explore: systematic exploration of kernel-path interleavings (issue 7).

Scenarios (:mod:`.scenarios`) race kernel paths written as ``@kpath`` generators; schedulers
(:mod:`.engine`) run them exhaustively up to a preemption bound, at random with a seed, or replay a
printed schedule; :mod:`.mutations` switches off one safety mechanism at a time.
"""

from kvmsim.explore.engine import (MAX_SCHEDULES, Coverage, Result, Run, execute, explore, format_schedule,
                                   parse_schedule, shrink)
from kvmsim.explore.mutations import MUTATIONS, Mutations
from kvmsim.explore.scenarios import SCENARIOS, Scenario

__all__ = ["MAX_SCHEDULES", "Coverage", "MUTATIONS", "Mutations", "Result", "Run", "SCENARIOS", "Scenario", "execute", "explore",
           "format_schedule", "parse_schedule", "shrink"]
