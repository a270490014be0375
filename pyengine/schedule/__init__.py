"""Schedules are data: spec -> per-rank action tables, plus a checker that proves them runnable.

    table = build(spec)          # {rank: [Action, ...]}, checked before it is returned
    check(table)                 # any table, hand-written or modified ones included
"""

from pyengine.schedule.actions import Action, ActionId, Kind, ScheduleError, Table
from pyengine.schedule.build import SCHEDULE_KINDS, build
from pyengine.schedule.check import check

__all__ = ["Action", "ActionId", "Kind", "SCHEDULE_KINDS", "ScheduleError", "Table", "build", "check"]
