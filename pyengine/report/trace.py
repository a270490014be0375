"""Chrome/Perfetto trace of a timeline (open in ui.perfetto.dev or chrome://tracing)."""

from __future__ import annotations

import json
import os

from pyengine.core.timeline import COMM_LANE, COMPUTE_LANE, Timeline

_LANE_TID = {COMPUTE_LANE: 0, COMM_LANE: 1}


def write_trace(tl: Timeline, path: str | os.PathLike) -> None:
    """Chrome/Perfetto JSON: one complete ("X") event per span; pid = rank, tid = lane
    (0 compute, 1 comm, named by thread_name metadata), name = action id, times in us."""
    events: list[dict] = []
    for r in tl.ranks:
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"GPU {r}"}})
        for lane, tid in _LANE_TID.items():
            events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid, "args": {"name": lane}})
    for s in tl.spans:
        events.append({"ph": "X", "name": s.name, "cat": s.kind, "pid": s.rank,
                       "tid": _LANE_TID.get(s.lane, len(_LANE_TID)),
                       "ts": s.start_s * 1e6, "dur": (s.end_s - s.start_s) * 1e6,
                       "args": {"kind": s.kind, "stage": s.stage, "micro_batch": s.micro_batch,
                                "lane": s.lane}})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                   "otherData": {"makespan_s": tl.makespan_s}}, f)
