"""flash-attn-4 as a backend of the zoo's attention ops.

CPU: the conversion of a `BlockSparseLayout` (and a key padding mask) into FA4's full / partial block lists,
checked by attending exactly as FA4 reads those lists (full blocks whole, partial blocks through the
padding, the sequence end masked) against the reference; and the dispatch decisions and their reasons,
with the GPU's capability and the install monkeypatched.

GPU (skipped without CUDA, without an sm90/sm100 GPU or without flash-attn-4): outputs, lse and gradients
against the float64 oracle of `test_kernels_block_sparse` (same bounds: 2x the error of the dtype's own
dense attention plus rounding), odd lengths, every head_dim the zoo runs FA4 with, key padding, token-major
inputs; radial masks against the Triton kernel; dense attention against SDPA.
"""
from __future__ import annotations

import math

import pytest
import torch
from script_modules import load_script
from zoo.ops import block_sparse_attention, block_sparse_backend, block_sparse_layout
from zoo.ops.block_sparse import fa4
from zoo.ops.block_sparse.naive import block_sparse_attention_reference

from zoo import ops


def _lists_to_sets(cnt: torch.Tensor, idx: torch.Tensor) -> dict[tuple[int, ...], set[int]]:
    """{(b, h, row): set of listed blocks} reading entries 0..count-1, as FA4 does."""
    out = {}
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in cnt.shape)).reshape(-1, cnt.ndim).tolist():
        n = int(cnt[tuple(pos)])
        out[tuple(pos)] = set(idx[tuple(pos)][:n].tolist())
    return out


def fa4_semantics(q, k, v, lists, kpm, block_q, block_k, scale):
    """Attention exactly as FA4 reads its forward lists: full blocks whole, partial blocks through the mask_mod
    (key not padded), keys past N_k masked; float64 [B, H, N_q, D] and lse."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    n_kb = math.ceil(n_k / block_k)
    visible = torch.zeros(b, h, math.ceil(n_q / block_q), n_kb * block_k, dtype=torch.bool)
    for kind in ("full", "mask"):
        cnt = lists[f"{kind}_block_cnt"].expand(b, h, -1)
        idx = lists[f"{kind}_block_idx"].expand(b, h, -1, -1)
        for (bi, hi, row), blocks in _lists_to_sets(cnt, idx).items():
            for block in blocks:
                keys = torch.zeros(n_kb * block_k, dtype=torch.bool)
                keys[block * block_k:(block + 1) * block_k] = True
                if kind == "mask":  # the mask_mod: keys whose padding aux entry is 0
                    keys &= fa4.padding_aux(kpm, b, block_k)[bi] == 0
                visible[bi, hi, row] |= keys
    token_mask = visible.repeat_interleave(block_q, 2)[:, :, :n_q, :n_k]
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return probs @ v.double(), lse


def _random_layout(batch, heads, n_q, n_k, block_q, block_k, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, math.ceil(n_q / block_q), math.ceil(n_k / block_k), generator=gen) < 0.5
    mask[..., -1] = True  # the partial tail key block listed
    mask[0, 0, 0] = False  # a query block with no keys
    return mask, block_sparse_layout(n_q, n_k, block_mask=mask, block_size=(block_q, block_k))


@pytest.mark.parametrize("padding", [None, "batch", "shared"])
def test_lists_attend_like_the_reference(padding):
    """FA4's lists (full + partial, tails, key padding) give the reference's attention, and the backward
    lists are their transposes (per key block, the query blocks), split the same way."""
    batch, heads, n_q, n_k, block_q, block_k, dim = 2, 3, 45, 70, 16, 16, 8  # tails of 13 and 6
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64) for n in (n_q, n_k, n_k))
    mask, layout = _random_layout(1 if padding == "shared" else batch, heads, n_q, n_k, block_q, block_k, 2)
    kpm = None
    if padding is not None:
        kpm = torch.rand(batch if padding == "batch" else 1, n_k, generator=gen) < 0.3
        kpm[:, block_k:2 * block_k] = False  # a listed block with no padding stays full
        kpm[:, -1] = True  # padding in the tail block
    lists = fa4.fa4_lists(layout, kpm)
    for name, t in lists.items():
        assert t.dtype == torch.int32 and t.is_contiguous(), name
    if kpm is None:
        assert int(lists["mask_block_cnt"].sum()) == 0
    else:
        assert int(lists["mask_block_cnt"].sum()) > 0 and int(lists["full_block_cnt"].sum()) > 0
    out, lse = fa4_semantics(q, k, v, lists, kpm if kpm is not None else torch.zeros(1, n_k, dtype=torch.bool),
                             block_q, block_k, dim**-0.5)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, block_mask=mask, block_size=(block_q, block_k),
                                                    return_lse=True, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)

    backward = fa4.fa4_lists(layout, kpm, backward=True)
    for kind in ("full", "mask"):
        fwd_sets = _lists_to_sets(lists[f"{kind}_block_cnt"], lists[f"{kind}_block_idx"])
        bwd_sets = _lists_to_sets(backward[f"{kind}_block_cnt"], backward[f"{kind}_block_idx"])
        pairs_fwd = {(b, h, row, col) for (b, h, row), cols in fwd_sets.items() for col in cols}
        pairs_bwd = {(b, h, row, col) for (b, h, col), rows in bwd_sets.items() for row in rows}
        assert pairs_fwd == pairs_bwd, kind
    for kind in ("full", "mask"):  # ascending lists: the tail block is a list's last entry (FA4 masks N_k there)
        cnt, idx = lists[f"{kind}_block_cnt"], lists[f"{kind}_block_idx"]
        valid = torch.arange(idx.shape[-1]) < cnt[..., None]
        steps = idx[..., 1:] - idx[..., :-1]
        assert bool((steps[valid[..., 1:]] > 0).all()), kind


def test_padding_helpers():
    kpm = torch.tensor([[False] * 5 + [True] + [False] * 4, [False] * 10])
    assert fa4.padded_key_blocks(kpm, 4).tolist() == [[False, True, False], [False, False, False]]
    aux = fa4.padding_aux(kpm[:1], 3, 4)
    assert aux.shape == (3, 12) and aux.dtype == torch.int32
    assert aux[2].tolist() == [0] * 5 + [1] + [0] * 4 + [1, 1]  # keys past N_k read as padded


def test_block_reasons_follow_fa4_tiles():
    assert fa4.fa4_block_reason(9, 128, 128, 10_000) is None
    assert fa4.fa4_block_reason(9, 384, 128, 10_000) is None
    assert "multiple of 128" in fa4.fa4_block_reason(9, 64, 128, 10_000)
    assert "key tile 128" in fa4.fa4_block_reason(9, 128, 64, 10_000)
    assert "key tile 128" in fa4.fa4_block_reason(10, 256, 256, 10_000)
    assert "multiple of 256" in fa4.fa4_block_reason(10, 128, 128, 10_000)  # two 128-row tiles per CTA
    assert fa4.fa4_block_reason(10, 128, 128, 100) is None  # one tile of queries: q_stage 1
    assert fa4.fa4_block_reason(10, 256, 128, 10_000) is None


@pytest.fixture
def gpu_like(monkeypatch):
    """CPU tensors seen as on an sm90 GPU with flash-attn-4 installed (only the decision logic runs)."""
    monkeypatch.setattr(fa4, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4, "fa4_interface", lambda: object())
    return monkeypatch


def test_can_run_reasons(gpu_like):
    q = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16)
    assert fa4.can_run_fa4(q, q, q, 128, 128) is None
    assert fa4.can_run_fa4_dense(q, q, q) is None
    assert "float32" in fa4.can_run_fa4(q.float(), q.float(), q.float(), 128, 128)
    small = q[..., :32]
    assert "head_dim" in fa4.can_run_fa4(small, small, small, 128, 128)
    assert "head_dim" in fa4.can_run_fa4_dense(q, q, q[..., :64])
    assert "block_size" in fa4.can_run_fa4(q, q, q, 64, 128)
    gpu_like.setattr(fa4, "device_capability", lambda device: (8, 0))
    assert "compute capability 8.0" in fa4.can_run_fa4(q, q, q, 128, 128)
    gpu_like.setattr(fa4, "device_capability", lambda device: (9, 0))
    gpu_like.setattr(fa4, "fa4_interface", lambda: "flash-attn-4 is not importable (ImportError: x); pip install")
    assert "not importable" in fa4.can_run_fa4(q, q, q, 128, 128)


def test_auto_skips_fa4_until_validated_on_a_gpu(gpu_like):
    q = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16)
    backend, reason = block_sparse_backend(q, q, q, 128, 128)
    assert backend == "reference" and reason.startswith("fa4: not yet validated on a GPU")
    assert block_sparse_backend(q, q, q, 128, 128, backend="fa4") == ("fa4", "")
    assert ops.dense_attention_backend(q, q, q)[0] == "sdpa"
    assert ops.dense_attention_backend(q, q, q, backend="fa4") == ("fa4", "")


def test_dispatch_decisions(gpu_like):
    gpu_like.setattr(fa4, "IN_AUTO", True)
    q = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16)
    assert block_sparse_backend(q, q, q, 128, 128) == ("fa4", "")
    backend, reason = block_sparse_backend(q, q, q, 64, 64)  # FA4 refuses the blocks; Triton is not on CPU
    assert backend == "reference" and reason.startswith("fa4: block_size") and "triton: tensors are on cpu" in reason
    assert block_sparse_backend(q, q, q, 64, 64, candidates=("triton", "reference"))[1].startswith("triton:")
    assert ops.dense_attention_backend(q, q, q) == ("fa4", "")
    assert ops.dense_attention_backend(q, q, q, backend="sdpa") == ("sdpa", "")
    gpu_like.setattr(fa4, "fa4_interface", lambda: "flash-attn-4 is not importable (ImportError: x)")
    backend, reason = ops.dense_attention_backend(q, q, q)
    assert backend == "sdpa" and reason.startswith("fa4: flash-attn-4 is not importable")


def test_named_backends_raise_with_the_reason():
    q = torch.randn(1, 2, 40, 64)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="backend='fa4' cannot run these inputs: tensors are on cpu"):
        block_sparse_attention(q, q, q, block_mask=mask, block_size=128, backend="fa4")
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: tensors are on cpu"):
        block_sparse_attention(q, q, q, block_mask=mask, block_size=128, backend="triton")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of fa4, triton, reference; got 'flash'"):
        block_sparse_attention(q, q, q, block_mask=mask, block_size=128, backend="flash")
    with pytest.raises(ValueError, match="backend='fa4' cannot run these inputs"):
        ops.dense_attention(q, q, q, backend="fa4")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of fa4, sdpa"):
        ops.dense_attention(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="backend='fa4' cannot run these inputs"):
        ops.radial_attention(q[:, :, :32], q[:, :, :32], q[:, :, :32], 2, 16, 1.0, block_size=16, backend="fa4")
    x = torch.randn(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="backend='fa4' does not run routing attention"):
        ops.bi_level_routing_attention(x, x, x, 2, 1, backend="fa4")
    out = block_sparse_attention(q, q, q, block_mask=mask, block_size=128, backend="reference")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_dense_attention_matches_softmax_with_gradients():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 11, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = ops.dense_attention(q, k, v, scale=0.3)
    expect = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expect, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_dit_dense_backend_calls_dense_attention(monkeypatch):
    from zoo.dit.attention import DenseAttention

    calls = []
    monkeypatch.setattr(ops, "dense_attention", lambda q, k, v: calls.append(q.shape) or q)
    q = torch.randn(1, 2, 4, 8)
    DenseAttention()(q, q, q, (2, 2))
    assert calls == [q.shape]


# ------------------------------------------------------------------ GPU
def _fa4_gpu() -> int:
    """The GPU's compute-capability major; skip unless an sm90/sm100 GPU and flash-attn-4 are there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    major = torch.cuda.get_device_capability()[0]
    if major not in fa4.FA4_ARCHS:
        pytest.skip(f"flash-attn-4 runs on sm90/sm100, this GPU is sm{major}x")
    pytest.importorskip("flash_attn.cute")
    return major


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", fa4.FA4_HEAD_DIMS)
def test_fa4_matches_oracle_gpu(dtype, dim):
    """Outputs, lse and gradients (through out and lse) against the float64 oracle: odd lengths with partial
    tails, q/k lengths that differ, an empty query block, -1 holes in unsorted lists; token-major inputs; key
    padding per batch and shared (a wholly padded block: rows that see no key give 0 and lse -inf)."""
    from test_kernels_block_sparse import assert_case, check_case

    major = _fa4_gpu()
    block_q = fa4.QUERY_MULTIPLE[major]
    cases = [dict(n_q=1001, n_k=1203), dict(n_q=777, n_k=777, token_major=True),
             dict(n_q=900, n_k=1111, padding="batch"), dict(n_q=1300, n_k=700, padding="shared")]
    for i, case in enumerate(cases):
        n_q, n_k = case.pop("n_q"), case.pop("n_k")
        result = check_case(dtype, 2, 3, n_q, n_k, dim, block_q, 128, 0.4, dim + i, "cuda", kernel=False,
                            backend="fa4", **case)
        assert_case(result, f"fa4 {dtype} d{dim} ({n_q}, {n_k}) {case}", backend="fa4")


@pytest.mark.gpu
@pytest.mark.parametrize("model,frames,per_frame,text", [("wan", 6, 30 * 52, 0), ("hunyuan", 5, 45 * 80 // 4, 256)])
def test_fa4_radial_against_triton_gpu(model, frames, per_frame, text):
    """Radial masks (Wan with its sink, HunyuanVideo with text tokens), bf16: FA4 and the Triton kernel against
    the float32 reference; FA4's errors (output and gradients) at most 2x the Triton kernel's plus bf16 rounding."""
    major = _fa4_gpu()
    if major == 10:
        pytest.skip("radial masks use 128-row query blocks; flash-attn-4 on sm100 needs multiples of 256")
    heads, dim = 2, 128
    n = frames * per_frame + text
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, dim, device="cuda", generator=gen).bfloat16() for _ in range(4))
    results = {}
    for backend in ("fa4", "triton", "reference"):
        leaves = [(t.float() if backend == "reference" else t).requires_grad_() for t in (q, k, v)]
        out = ops.radial_attention(*leaves, frames, per_frame, 1.0, model=model, text_tokens=text, backend=backend)
        results[backend] = [out.float(), *(g.float() for g in torch.autograd.grad(out, leaves, do.to(out.dtype)))]
    for name, f, t, r in zip(("out", "dq", "dk", "dv"), results["fa4"], results["triton"], results["reference"]):
        err_fa4, err_triton = (f - r).abs().max().item(), (t - r).abs().max().item()
        rounding = (r.bfloat16().float() - r).abs().max().item()
        assert err_fa4 <= 2 * err_triton + rounding, f"{model} {name}: fa4 {err_fa4:.3g} vs triton {err_triton:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dim", fa4.FA4_HEAD_DIMS)
def test_fa4_dense_against_sdpa_gpu(dim):
    """Dense FA4 (`zoo.ops.dense_attention`) against float64 attention, with gradients; cross attention lengths;
    its errors at most 2x SDPA's (flash/cuDNN, bf16) plus rounding."""
    _fa4_gpu()
    gen = torch.Generator(device="cuda").manual_seed(dim)
    q = torch.randn(2, 3, 1001, dim, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(2, 3, 777, dim, device="cuda", generator=gen).bfloat16() for _ in range(2))
    do = torch.randn_like(q)
    assert ops.dense_attention_backend(q, k, v, backend="fa4") == ("fa4", "")
    results = {}
    for backend in ("fa4", "sdpa", "exact"):
        leaves = [(t.double() if backend == "exact" else t).requires_grad_() for t in (q, k, v)]
        out = ops.dense_attention(*leaves, backend="sdpa" if backend == "exact" else backend)
        results[backend] = [out.double(), *(g.double() for g in torch.autograd.grad(out, leaves, do.to(out.dtype)))]
    for name, f, s, e in zip(("out", "dq", "dk", "dv"), results["fa4"], results["sdpa"], results["exact"]):
        err_fa4, err_sdpa = (f - e).abs().max().item(), (s - e).abs().max().item()
        rounding = (e.bfloat16().double() - e).abs().max().item()
        assert err_fa4 <= 2 * err_sdpa + rounding, f"d{dim} {name}: fa4 {err_fa4:.3g} vs sdpa {err_sdpa:.3g}"


# ------------------------------------------------------------------ the GPU scripts, without a GPU
def test_benchmark_fa4_targets_and_arguments():
    bench = load_script("benchmark_fa4")
    args = bench.parse_args(["--shape", "hunyuan720", "--dense-lists", "--modes", "fwd"])
    assert args.shape == ["hunyuan720"] and args.modes == ["fwd"] and bench.TEXT_TOKENS["hunyuan720"] == 256
    times = {("fwd", "cudnn"): 11.71, ("fwd", "fa4"): 3.64, ("fwd", "flex"): 5.82, ("fwd", "fa4_dense"): 9.66,
             ("fwd", "fa4_dense_lists"): 10.5}  # issue 15's H200 numbers (the last one made up: a miss)
    met = bench.targets(times, 0.344, ["fwd"])
    assert [(target.split(":")[1].split()[:3], ok) for target, _, ok in met] == [
        (["fa4", ">=", "3.05x"], True), (["fa4", ">=", "1.5x"], True), (["fa4", "dense", "lists"], False)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "bwd"])


def test_benchmark_sla_composition_is_sla():
    """The benchmark's SLA-on-FA4 composition (here with the reference as its sparse branch) equals the op."""
    bench = load_script("benchmark_fa4")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    weight, bias = torch.randn(8, 8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen).double()
    block_map = ops.sla_block_map(q, k, 0.3, 0.0, 16)
    critical = block_sparse_layout(40, 40, block_mask=block_map == 1, block_size=16)
    got = bench.sla_fa4(q, k, v, weight, bias, block_map, critical, backend="reference")
    expect = ops.sparse_linear_attention(q, k, v, weight, bias, block_size=16, block_map=block_map)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


def test_check_fa4_reports_why_it_cannot_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs for real (see its docstring)")
    check = load_script("check_fa4")
    assert check.main() == 1
    assert "no CUDA GPU" in capsys.readouterr().out
