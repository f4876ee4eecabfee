"""One-run smoke check of the flash-attn-4 backend on a GPU: every step prints, a failing step does not stop the rest.

1. import: flash-attn-4 and nvidia-cutlass-dsl versions, the GPU, the backends the zoo would choose;
2. dense: `zoo.ops.dense_attention(backend="fa4")` forward and backward against float64 attention, next to SDPA;
3. block-sparse: `block_sparse_attention(backend="fa4")` forward and backward against the float32/64 reference,
   next to the Triton kernel: small odd-length cases per head_dim (random lists, key padding) and radial masks at
   real sizes (Wan 480p, HunyuanVideo 720p with its 256 text tokens; fewer heads to keep the reference quick).

Verdict per row: PASS when FA4's max error is at most 2x the Triton kernel's (SDPA's for dense) plus the dtype's
rounding of the exact result, the tests' bound. Exit status 1 if any step failed or missed.

    source .fa4/01/install.sh && python scripts/check_fa4.py
"""
from __future__ import annotations

import importlib.metadata
import math
import sys
import time
import traceback

import torch
from zoo.ops.block_sparse import fa4

from zoo import ops

FAILURES: list[str] = []
STEPS: list[tuple[str, object]] = []


def step(name):
    """Register a check, run in order by `main`."""
    def register(fn):
        STEPS.append((name, fn))
        return fn
    return register


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compare(label: str, fast: list[torch.Tensor], base: list[torch.Tensor], exact: list[torch.Tensor],
            base_name: str, dtype: torch.dtype) -> None:
    """Print FA4's and the baseline's max errors against `exact` per tensor, and the verdict."""
    for name, f, b, e in zip(("out", "dq", "dk", "dv"), fast, base, exact):
        f, b, e = f.double(), b.double(), e.double()
        err_f, err_b = (f - e).abs().max().item(), (b - e).abs().max().item()
        rounding = (e.to(dtype).double() - e).abs().max().item()
        ok = math.isfinite(err_f) and err_f <= 2 * err_b + rounding
        if not ok:
            FAILURES.append(f"{label} {name}: fa4 {err_f:.3g} > 2 x {base_name} {err_b:.3g} + {rounding:.3g}")
        print(f"  {'PASS' if ok else 'FAIL'} {label:40s} {name:3s} max|fa4 - exact| {err_f:.3g}  "
              f"max|{base_name} - exact| {err_b:.3g}  rounding {rounding:.3g}")


def run(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


@step("import and backend choice")
def check_import():
    print(f"  torch {torch.__version__}; flash-attn-4 {version('flash-attn-4')}; "
          f"nvidia-cutlass-dsl {version('nvidia-cutlass-dsl')}; quack-kernels {version('quack-kernels')}")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU")
    print(f"  GPU {torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))})")
    module = fa4.fa4_interface()
    if isinstance(module, str):
        raise RuntimeError(module)
    print(f"  flash_attn.cute.interface imported from {module.__file__}")
    q = torch.zeros(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16)
    print(f"  dense_attention_backend (Wan 480p): {ops.dense_attention_backend(q, q, q)}")
    for blocks in ((128, 128), (256, 128), (64, 64)):
        print(f"  block_sparse_backend blocks {blocks}: {ops.block_sparse_backend(q, q, q, *blocks)}")


@step("dense attention: fa4 vs SDPA vs float64, forward + backward")
def check_dense():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dim in fa4.FA4_HEAD_DIMS:
        for n_q, n_k in ((1001, 1001), (777, 1203)):
            q = torch.randn(2, 3, n_q, dim, device="cuda", generator=gen).bfloat16()
            k, v = (torch.randn(2, 3, n_k, dim, device="cuda", generator=gen).bfloat16() for _ in range(2))
            do = torch.randn_like(q)
            fast = run(lambda a, b, c: ops.dense_attention(a, b, c, backend="fa4"), (q, k, v), do)
            sdpa = run(lambda a, b, c: ops.dense_attention(a, b, c, backend="sdpa"), (q, k, v), do)
            exact = run(lambda a, b, c: ops.dense_attention(a, b, c, backend="sdpa"),
                        (q.double(), k.double(), v.double()), do)
            compare(f"dense d{dim} ({n_q}, {n_k})", fast, sdpa, exact, "sdpa", torch.bfloat16)


def sparse_case(label, q, k, v, do, run_op, dtype):
    """Run `run_op(a, b, c, backend)` with fa4, triton and the reference (inputs upcast) and compare."""
    fast = run(lambda a, b, c: run_op(a, b, c, "fa4"), (q, k, v), do)
    triton = run(lambda a, b, c: run_op(a, b, c, "triton"), (q, k, v), do)
    exact_dtype = torch.float64 if q.shape[2] * q.shape[1] <= 1 << 16 else torch.float32
    exact = run(lambda a, b, c: run_op(a, b, c, "reference"), (q.to(exact_dtype), k.to(exact_dtype),
                                                                v.to(exact_dtype)), do)
    compare(label, fast, triton, exact, "triton", dtype)


@step("block-sparse: small odd lengths, every head_dim, key padding")
def check_sparse_small():
    major = torch.cuda.get_device_capability()[0]
    block_q = fa4.QUERY_MULTIPLE.get(major, 128)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dim in fa4.FA4_HEAD_DIMS:
        for n_q, n_k, padding in ((1001, 1203, False), (900, 1111, True)):
            q = torch.randn(2, 3, n_q, dim, device="cuda", generator=gen).bfloat16()
            k, v = (torch.randn(2, 3, n_k, dim, device="cuda", generator=gen).bfloat16() for _ in range(2))
            do = torch.randn_like(q)
            mask = torch.rand(2, 3, math.ceil(n_q / block_q), math.ceil(n_k / 128), device="cuda", generator=gen) < 0.4
            mask[..., -1] = True  # the partial tail key block
            mask[0, 0, 0] = False  # a query block with no keys: zeros
            kpm = None
            if padding:
                kpm = torch.rand(2, n_k, device="cuda", generator=gen) < 0.3
                kpm[:, 128:256] = False  # a listed block without padding stays a full block
                kpm[:, :128] = True  # a wholly padded block: query blocks listing only it see no key

            def op(a, b, c, backend, mask=mask, kpm=kpm):
                return ops.block_sparse_attention(a, b, c, block_mask=mask, block_size=(block_q, 128),
                                                  key_padding_mask=kpm, backend=backend)
            sparse_case(f"d{dim} ({n_q}, {n_k}) blocks ({block_q}, 128){' padded' if padding else ''}",
                        q, k, v, do, op, torch.bfloat16)


@step("block-sparse: radial masks at real sizes (1 head)")
def check_sparse_radial():
    if torch.cuda.get_device_capability()[0] == 10:
        print("  skipped: radial masks use 128-row query blocks, flash-attn-4 on sm100 needs multiples of 256")
        return
    gen = torch.Generator(device="cuda").manual_seed(2)
    for label, model, frames, per_frame, text in (("Wan 480p", "wan", 21, 30 * 52, 0),
                                                   ("HunyuanVideo 720p", "hunyuan", 33, 45 * 80, 256)):
        n = frames * per_frame + text
        q, k, v, do = (torch.randn(1, 1, n, 128, device="cuda", generator=gen).bfloat16() for _ in range(4))

        def op(a, b, c, backend, model=model, frames=frames, per_frame=per_frame, text=text):
            return ops.radial_attention(a, b, c, frames, per_frame, 0.2, model=model, text_tokens=text,
                                        backend=backend)
        sparse_case(f"radial {label} N={n}", q, k, v, do, op, torch.bfloat16)


def main() -> int:
    for name, fn in STEPS:
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:  # report and go on: the point is one diagnosable output
            FAILURES.append(f"{name}: {type(err).__name__}: {err}")
            print("  ERROR " + "".join(traceback.format_exception(err)[-6:]).replace("\n", "\n  "))
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
        if name.startswith("import") and FAILURES:
            break  # nothing else can run
    print("\n" + ("ALL PASSED" if not FAILURES else f"{len(FAILURES)} FAILED:\n  " + "\n  ".join(FAILURES)))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
