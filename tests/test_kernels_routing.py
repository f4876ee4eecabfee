"""bi_level_routing_attention on the Triton block-sparse kernel against an independent gather oracle.

Oracle: each region's real tokens attend to the real tokens of the regions it routes to, gathered
explicitly (the official algorithm's top-k copy, allowed in tests; region members listed token by
token from the rule), in float64. The routing is the one the op returns, checked equal to
`bra_routing` on the same inputs: top-k flips under rounding, so the oracle reuses it instead of
recomputing it in float64. Tolerance as in test_kernels_block_sparse.py: the same oracle run at the
inputs' precision (scores from the low-precision matmul, probabilities rounded to the dtype before
P @ V, as a flash kernel rounds them) sets the bound, 2x its error plus the rounding of the exact
result to the dtype; a wrong slot, mask or routed region gives errors of order 1. The PyTorch
reference path (exactly R slots per region) runs on the same inputs: same routing, and it must
meet the same bound.

CPU: the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET=1 is read at
import) with `zoo.ops.block_sparse.KERNEL_DEVICES` widened to CPU tensors, so the public op takes
its kernel path (asserted: the kernel is called and the backend says "triton"). float16 only there
(the interpreter's tl.dot mishandles bfloat16, see test_kernels_block_sparse.py); bfloat16 on GPU.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from interpreter import run_interpreter
from kernel_checks import assert_bounded, bounded_error, nan_poisoned_allocations, poison_cuda_allocator, rounding_error
from zoo.ops import bi_level_routing_attention, bi_level_routing_backend, bra_routing
from zoo.ops.routing import region_slots

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def counting(kernel_fn, calls: list):
    """`kernel_fn` that records, per call, whether it masks slots: None if it did not read the map in place
    (no region windows), else the windows' `masked` flag."""
    def counted(*args, **kwargs):
        window = kwargs.get("window")
        calls.append(None if window is None else window.masked)
        return kernel_fn(*args, **kwargs)
    return counted


def region_members(height: int, width: int, n_win: int) -> torch.Tensor:
    """Long `[n_win^2, R]`: flat token ids (y * W + x) of each region, row-major inside, -1 padded.

    Regions have side ceil(H / n_win) x ceil(W / n_win) (the official geometry); border ones are partial."""
    rh, rw = math.ceil(height / n_win), math.ceil(width / n_win)
    members = [[] for _ in range(n_win * n_win)]
    for y in range(height):
        for x in range(width):
            members[(y // rh) * n_win + x // rw].append(y * width + x)
    out = torch.full((n_win * n_win, rh * rw), -1, dtype=torch.long)
    for r, ids in enumerate(members):
        out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def gather_oracle(q, k, v, routing, members, scale, upcast):
    """Attention of each region's tokens over its routed regions' tokens, gathered; float64 if upcast."""
    b, h, w, heads, d = q.shape
    members = members.to(q.device)
    routing = routing.to(q.device)
    qf, kf, vf = (t.reshape(b, h * w, heads, -1) for t in (q, k, v))
    if upcast:
        qf, kf, vf = qf.double(), kf.double(), vf.double()
    n_regions, size = members.shape
    keys = members[routing.clamp_min(0)]  # [B, n_regions, topk, R]
    key_ok = ((keys >= 0) & (routing >= 0)[..., None]).flatten(2)  # [B, n_regions, topk * R]
    batch = torch.arange(b, device=q.device)[:, None, None]
    q_g = qf[:, members.clamp_min(0)].permute(0, 1, 3, 2, 4)  # [B, n_regions, heads, R, D]
    k_g = kf[batch, keys.flatten(2).clamp_min(0)].permute(0, 1, 3, 2, 4)  # [B, n_regions, heads, L, D]
    v_g = vf[batch, keys.flatten(2).clamp_min(0)].permute(0, 1, 3, 2, 4)
    scores = ((q_g * scale) @ k_g.transpose(-1, -2)).to(torch.float64 if upcast else torch.float32)
    scores = scores.masked_fill(~key_ok[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    out = probs.to(v_g.dtype) @ v_g  # [B, n_regions, heads, R, Dv]
    flat = members.flatten()
    position = torch.empty(h * w, dtype=torch.long, device=q.device)  # token -> its row in region order
    position[flat[flat >= 0]] = torch.arange(flat.numel(), device=q.device)[flat >= 0]
    out = out.permute(0, 1, 3, 2, 4).reshape(b, n_regions * size, heads, -1)[:, position]
    return out.reshape(b, h, w, heads, -1)


def check_routing_case(dtype, batch, height, width, heads, dim, n_win, topk, seed, device):
    """Kernel path, reference path and oracles on one random case: dict of errors and bounds."""
    import zoo.ops.block_sparse as bs
    from zoo.ops.block_sparse import kernel as bsk

    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q, k, v, do = (torch.randn(batch, height, width, heads, dim, generator=gen).to(device, dt) for _ in range(4))
    scale = (heads * dim) ** -0.5  # the released models' full-width scale

    def run(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, routing = fn(*leaves)
        grads = torch.autograd.grad((out.double() * do.double()).sum(), leaves)
        return routing, [out.detach(), *grads]

    calls, triton_fn = [], bsk.block_sparse_attention_triton
    bsk.block_sparse_attention_triton = counting(triton_fn, calls)
    try:
        backend = bi_level_routing_backend(q, k, v, n_win)
        routing, fast = run(lambda a, b, c: bi_level_routing_attention(a, b, c, n_win, topk, scale=scale,
                                                                       return_routing=True), [q, k, v])
        devices, bs.KERNEL_DEVICES = bs.KERNEL_DEVICES, ()  # the PyTorch reference path on the same inputs
        try:
            routing_ref, ref = run(lambda a, b, c: bi_level_routing_attention(a, b, c, n_win, topk, scale=scale,
                                                                              return_routing=True), [q, k, v])
        finally:
            bs.KERNEL_DEVICES = devices
    finally:
        bsk.block_sparse_attention_triton = triton_fn
    members = region_members(height, width, n_win)
    exact = run(lambda a, b, c: (gather_oracle(a, b, c, routing, members, scale, True), None),
                [q.double(), k.double(), v.double()])[1]
    low = run(lambda a, b, c: (gather_oracle(a, b, c, routing, members, scale, False), None), [q, k, v])[1]
    result = {
        "backend": list(backend), "kernel_calls": len(calls), "masked": calls[0] if calls else None,
        "routing_is_bra_routing": bool(torch.equal(routing, bra_routing(q, k, n_win, topk, scale=scale))),
        "reference_same_routing": bool(torch.equal(routing, routing_ref)),
    }
    for name, f, r, lo, ex in zip(("out", "dq", "dk", "dv"), fast, ref, low, exact):
        result[name] = dict(bounded_error(f, lo, ex, rounding_error(ex, dt)), reference=(r.double() - ex).abs().max().item())
    return result


def assert_routing_case(result, label, padded):
    assert result["backend"] == ["triton", ""], f"{label}: not on the kernel: {result['backend']}"
    assert result["kernel_calls"] == 1 and result["masked"] is padded, f"{label}: {result}"
    assert result["routing_is_bra_routing"] and result["reference_same_routing"], f"{label}: routing differs"
    assert_bounded(result, label, ("out", "dq", "dk", "dv"))
    for name in ("out", "dq", "dk", "dv"):
        r = result[name]
        assert r["reference"] <= r["bound"], f"{label}: reference {name} error {r['reference']:.3g} > bound {r}"


# ------------------------------------------------------------------ CPU, Triton interpreter
# (dtype, batch, height, width, heads, head_dim, n_win, topk, seed): every slot count rule and head_dim,
# partial border regions (masked tokens inside the map), regions that fill their slots exactly (no mask),
# 1-token regions (dense), regions larger than a tile, packed list tiles (regions of at most half their slots).
INTERPRETER_GROUPS = [
    [
        ("float16", 1, 9, 11, 2, 32, 3, 2, 1),  # 3x4 = 12 tokens -> 16 slots, partial both sides
        ("float16", 2, 8, 8, 1, 64, 2, 2, 2),  # 4x4 = 16 tokens -> 16 slots: no padding at all
        ("float16", 1, 7, 7, 1, 128, 7, 49, 3),  # 1-token regions, every region routed: dense attention
        ("float16", 1, 7, 9, 2, 64, 3, 4, 8),  # 3x3 = 9 tokens -> 16 slots, packed lists, partial regions
    ],
    [
        ("float16", 1, 14, 14, 2, 32, 7, 16, 4),  # BiFormer stage 3 at 224: 2x2 tokens -> 16 slots, topk 16
        ("float16", 1, 11, 13, 1, 64, 2, 3, 5),  # 6x7 = 42 -> 64 slots, partial
        ("float16", 1, 25, 24, 1, 32, 2, 3, 6),  # 13x12 = 156 -> 192 slots (3 tiles of 64), partial rows
        ("float16", 2, 10, 12, 2, 32, 2, 1, 7),  # 5x6 = 30 -> 32 slots, top-1
    ],
]


def _padded(height, width, n_win):
    rh, rw = math.ceil(height / n_win), math.ceil(width / n_win)
    return (rh * n_win, rw * n_win) != (height, width) or region_slots(rh * rw) != rh * rw


@pytest.mark.parametrize("group", range(len(INTERPRETER_GROUPS)))
def test_routing_kernel_matches_oracle_interpreter(group):
    cases = INTERPRETER_GROUPS[group]
    for case, result in zip(cases, run_interpreter(__file__, cases)):
        assert_routing_case(result, str(case), _padded(case[2], case[3], case[6]))


def test_region_slots_and_backend_on_cpu():
    assert [region_slots(r) for r in (1, 4, 16, 17, 32, 33, 64, 65, 100, 256, 361, 1369)] == [
        16, 16, 16, 32, 32, 64, 64, 128, 128, 256, 384, 1408]
    q = torch.randn(1, 6, 6, 1, 32, dtype=torch.float16)
    backend, reason = bi_level_routing_backend(q, q, q, 3)
    assert backend == "reference" and "cpu" in reason


# ------------------------------------------------------------------ GPU, real sizes
# BiFormer-S routed stages (heads x 32): 224 / n_win 7 (regions of 64, 16, 4 tokens), 1024 / n_win 16 (the
# official COCO setting: 256, 64, 16 tokens) and 1024 / n_win 7 with masked partial regions (37x37 = 1369,
# 19x19 = 361, 10x10 = 100 tokens); a dense 1-token-region map; other head dims.
GPU_CASES = [
    (2, 56, 2, 32, 7, 1), (2, 28, 4, 32, 7, 4), (2, 14, 8, 32, 7, 16),
    (1, 256, 2, 32, 16, 1), (1, 128, 4, 32, 16, 4), (1, 64, 8, 32, 16, 16),
    (1, 256, 2, 32, 7, 1), (1, 128, 4, 32, 7, 4), (1, 64, 8, 32, 7, 16),
    (2, 7, 16, 32, 7, 49), (2, 30, 2, 64, 7, 4), (2, 45, 2, 128, 7, 4),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch,side,heads,dim,n_win,topk", GPU_CASES)
def test_routing_kernel_matches_oracle_gpu(dtype, batch, side, heads, dim, n_win, topk):
    poison_cuda_allocator()
    result = check_routing_case(dtype, batch, side, side, heads, dim, n_win, topk, side + topk, "cuda")
    assert_routing_case(result, f"{dtype} {side}x{side} heads {heads}x{dim} n_win {n_win} topk {topk}",
                        _padded(side, side, n_win))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", [224, 200])
def test_biformer_small_routed_layers_run_on_kernel_gpu(size):
    """Every routed layer of biformer_small (bf16, CUDA) calls the kernel, at 224 (regions of 64/16/4 tokens)
    and at 200 (partial border regions: masked tokens), and forward/backward stay finite."""
    from zoo.ops.block_sparse import kernel as bsk

    import zoo

    model = zoo.create_model("biformer_small").cuda().to(torch.bfloat16)
    layers = sum(type(m).__name__ == "BiLevelRoutingAttention" for m in model.modules())
    calls, triton_fn = [], bsk.block_sparse_attention_triton
    bsk.block_sparse_attention_triton = counting(triton_fn, calls)
    try:
        x = torch.randn(2, 3, size, size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        logits = model(x)
        logits.float().square().mean().backward()
    finally:
        bsk.block_sparse_attention_triton = triton_fn
    assert layers == 26 and len(calls) == layers and None not in calls, (layers, calls)
    assert sum(calls) == (18 if size == 224 else layers)  # 224: only the 4-token regions (stage 3) are masked
    assert torch.isfinite(logits).all() and torch.isfinite(x.grad).all()


if __name__ == "__main__":  # interpreter subprocess: kernel path on CPU tensors, results as JSON
    import zoo.ops.block_sparse as block_sparse

    block_sparse.KERNEL_DEVICES = ("cuda", "cpu")
    cases = json.loads(sys.argv[1])
    with nan_poisoned_allocations():  # an unwritten tile of any buffer reads NaN
        print(json.dumps([check_routing_case(*case, device="cpu") for case in cases]))
