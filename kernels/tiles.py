"""Tile scheduling shared by the grouped expert GEMMs."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped launch order: GROUP_M consecutive row tiles
    (mostly one expert) sweep the same weight columns together, so each weight tile is read
    from HBM about once instead of once per row tile."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size
