"""The nccl-tests text table of `pyengine bench comm` (provenance header, one row per size)."""

from __future__ import annotations

def format_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# pyengine bench comm: op {meta['op']}, backend {meta['backend']}, nranks {meta['nranks']}, "
        f"device {meta['device']}",
        f"# date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}",
        f"# command: {meta['command']}",
        f"# iters {meta['iters']}, warmup {meta['warmup']}, check {int(meta['check'])}",
        "#",
        f"# {'size':>10} {'count':>12} {'type':>9} {'redop':>6} {'root':>5} "
        f"{'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}",
        f"# {'(B)':>10} {'(elements)':>12} {'':>9} {'':>6} {'':>5} "
        f"{'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>7}",
    ]
    redop = "sum" if meta["op"] in ("all_reduce", "reduce_scatter") else "none"
    root = str(meta["root"]) if meta["op"] == "broadcast" else "-1"
    for r in rows:
        wrong = "N/A" if r["wrong"] < 0 else str(r["wrong"])
        lines.append(f"  {r['size']:>10} {r['count']:>12} {meta['type']:>9} {redop:>6} {root:>5} "
                     f"{r['time_us']:>10.1f} {r['algbw_GBps']:>8.3f} {r['busbw_GBps']:>8.3f} "
                     f"{wrong:>7}")
    total_wrong = sum(max(0, r["wrong"]) for r in rows)
    avg = sum(r["busbw_GBps"] for r in rows) / len(rows) if rows else 0.0
    lines.append(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}")
    lines.append(f"# Avg bus bandwidth    : {avg:.4g}")
    return "\n".join(lines)

