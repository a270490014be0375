"""`pyengine bench comm`: the nccl-tests-style harness (pyengine.commbench).

The kernel and pipeline suites are scripts in bench/ (they need a GPU and a checkout).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="microbenchmarks (comm: nccl-tests-style table)")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    comm = suites.add_parser("comm", help="collective / send-recv bandwidth, nccl-tests columns")
    from pyengine.commbench import cli

    cli.add_arguments(comm)
    comm.set_defaults(func=cli.run)
