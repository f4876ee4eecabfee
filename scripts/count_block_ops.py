"""Count the ops one block of each linear / agent family dispatches: a CPU proxy for GPU kernel launches (issue 20).

No timing: on an H200 a small block is launch-bound, so the glue around the attention (casts, copies, feature
maps, bias resizes) costs roughly per op, whatever its size. This counts, with a TorchDispatchMode, every op
that would launch a CUDA kernel in one block's forward (eval, no_grad) and forward + backward (train), under
bfloat16 autocast, with the GPU backends dispatched: the Triton linear-attention kernel (run by Triton's
interpreter on CPU) and agent attention's SDPA path. Views and bare allocations are not counted; a `zoo::`
custom op counts as one op (each linear-attention call runs a state memset and two Triton kernels inside, in
either direction). CPU autocast casts at the same ops as CUDA's for these blocks (linear, conv, matmul, SDPA),
so the counts carry over. The timm Swin and DeiT blocks are the comparison. Example:
    python scripts/count_block_ops.py                      # the table
    python scripts/count_block_ops.py --json after.json --baseline before.json --ops agent_swin
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# label -> (model, block path inside it): the block the family repeats most (agent Swin-T stage 3; the linear
# families' stage 2, since their stages 3-4 are softmax), and timm's blocks at the same place
FAMILIES = {
    "agent_swin": ("agent_swin_tiny", "layers.2.blocks.0"),
    "flatten_swin": ("flatten_swin_tiny", "layers.1.blocks.0"),
    "inline_swin": ("inline_swin_tiny", "layers.1.blocks.0"),
    "agent_deit": ("agent_deit_small", "blocks.0"),
    "mavit": ("mavit_tiny", "layers.1.blocks.0"),
    "ravlt": ("ravlt_tiny", "layers.1.blocks.0"),
    "timm_swin": ("swin_tiny_patch4_window7_224", "layers.1.blocks.0"),
    "timm_swin_shifted": ("swin_tiny_patch4_window7_224", "layers.1.blocks.1"),
    "timm_deit": ("deit_small_patch16_224", "blocks.0"),
}
# ops without a kernel besides views: bare allocations (a CUDA empty is no launch) and `_unsafe_view` (a view
# that autograd does not track as one)
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Tallies the dispatched ops that launch a kernel (views and bare allocations excluded), by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_LAUNCH:
            self.ops[f"{func.namespace}.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_backends(device: str) -> Iterator[None]:
    """Within: zoo's linear and agent ops take their GPU paths on `device` too (the interpreter on CPU)."""
    import zoo.ops.agent as agent_ops
    import zoo.ops.linear as linear_ops

    saved = linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES
    linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES = (*saved[0], device), (*saved[1], device)
    try:
        yield
    finally:
        linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES = saved


def build(model_name: str, device: str) -> torch.nn.Module:
    """The model at 224 without stochastic depth (its ops are the same in every family)."""
    if model_name.startswith(("swin_", "deit_")):
        import timm

        return timm.create_model(model_name, pretrained=False, drop_path_rate=0.0).to(device)
    import zoo

    return zoo.create_model(model_name, drop_path_rate=0.0).to(device)


def block_inputs(model: torch.nn.Module, block: torch.nn.Module, device: str) -> tuple[tuple, dict]:
    """The block's positional and keyword inputs in a forward of the whole model on one 224 image."""
    captured = {}

    def grab(_module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 224, 224, device=device))
    finally:
        handle.remove()
    return captured["inputs"]


def count_block(model_name: str, block_path: str, device: str = "cpu", batch: int = 2) -> dict:
    """{"forward": ops of one eval forward, "train": ops of one train forward + backward, "*_ops": by name}."""
    torch.manual_seed(0)
    model = build(model_name, device)
    block = model.get_submodule(block_path)
    args, kwargs = block_inputs(model, block, device)
    x = args[0].detach().expand(batch, *args[0].shape[1:]).clone()
    rest = args[1:]
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    with gpu_backends(device):
        block.eval()
        for counter in (OpCounter(), OpCounter()):  # steady state: the first call fills caches (uncounted)
            with torch.no_grad(), autocast, counter:
                block(x, *rest, **kwargs)
        forward = counter
        block.train()  # fresh graphs every step: nothing to warm up
        leaf = x.clone().requires_grad_()
        with autocast:
            grad = torch.randn_like(block(leaf, *rest, **kwargs))
        block.zero_grad(set_to_none=True)
        with OpCounter() as train:
            with autocast:
                out = block(leaf, *rest, **kwargs)
            out.backward(grad)
    return {"forward": sum(forward.ops.values()), "train": sum(train.ops.values()),
            "forward_ops": dict(forward.ops), "train_ops": dict(train.ops)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu (Triton interpreter) or cuda (the real kernels)")
    parser.add_argument("--json", type=pathlib.Path, help="write the counts here")
    parser.add_argument("--baseline", type=pathlib.Path, help="a --json of an earlier run: print before vs after")
    parser.add_argument("--ops", default="", help="comma-separated families whose ops to list by name")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    if args.device == "cpu":  # the Triton kernels run in the interpreter (read when the kernel module is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    baseline = json.loads(args.baseline.read_text()) if args.baseline else {}
    results = {}
    print(f"{'family':<18} {'block':<40} {'fwd':>9} {'fwd+bwd':>11}")
    for family in families:
        model_name, path = FAMILIES[family]
        results[family] = r = count_block(model_name, path, args.device)
        before = baseline.get(family)
        cells = [f"{before[k]} -> {r[k]}" if before else str(r[k]) for k in ("forward", "train")]
        print(f"{family:<18} {model_name + ' ' + path:<40} {cells[0]:>9} {cells[1]:>11}")
        if family in args.ops.split(","):
            for phase in ("forward_ops", "train_ops"):
                print(f"  {phase}: " + ", ".join(f"{n} {c}" for n, c in sorted(r[phase].items(), key=lambda t: -t[1])))
    if args.json:
        from zoo.weights import atomic_path

        with atomic_path(args.json) as tmp:
            pathlib.Path(tmp).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
