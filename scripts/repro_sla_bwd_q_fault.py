"""Reproduce the SLA backward fault at one launch setting (bwd_q at 8 warps, 1 stage) on a Hopper GPU.

BENCHMARKS_SLA.md ("the bwd_q (8 warps, 1 stage) fault"): compute-sanitizer reports an out-of-range shared or
local address inside the code Triton 3.6 generates for a `tl.dot` of that kernel; the defaults never use
the setting. Usage (CUDA):  [compute-sanitizer --tool memcheck] python scripts/repro_sla_bwd_q_fault.py N BLOCK_Q
"""
import sys

import torch
from zoo.ops import sparse_linear_attention
from zoo.ops.sla import kernel as sla_kernel


def main(n: int = 4096, block_q: int = 128) -> None:
    sla_kernel.LAUNCH["bwd_q"][(128, min(block_q, sla_kernel.BWD_Q_TILE))] = (8, 1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    weight = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    out = sparse_linear_attention(q, k, v, weight, block_size=(block_q, 64))
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    print(f"no fault at N {n}, blocks ({block_q}, 64)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
