"""kvmsim.explore: systematic exploration of kernel-path interleavings (issue 7).

Scenarios (:mod:`.scenarios`) race kernel paths written as ``@kpath`` generators; schedulers
(:mod:`.engine`) run them exhaustively up to a preemption bound, at random with a seed, or replay a
printed schedule; :mod:`.mutations` switches off one safety mechanism at a time.  :mod:`.por` records
what each step reads and writes, for the sleep-set and DPOR (:mod:`.dpor`) reductions of the DFS;
:func:`.engine.frontier` and :func:`.engine.search_subtree` split the DFS into subtrees.
"""

from kvmsim.explore.engine import (MAX_SCHEDULES, Coverage, FrontierItem, Reduction, Result, Run, execute, explore,
                                   format_schedule, frontier, parse_schedule, search_subtree, shrink)
from kvmsim.explore.mutations import MUTATIONS, Mutations
from kvmsim.explore.scenarios import SCENARIOS, Scenario

__all__ = ["MAX_SCHEDULES", "Coverage", "FrontierItem", "MUTATIONS", "Mutations", "Reduction", "Result", "Run", "SCENARIOS",
           "Scenario", "execute", "explore", "format_schedule", "frontier", "parse_schedule", "search_subtree", "shrink"]
