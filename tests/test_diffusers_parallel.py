"""zoo.diffusers sparse steps under diffusers' Ulysses context parallelism: 2 processes equal 1.

Each rank builds the same tiny Wan transformer with a plugin, runs forward and backward once
without parallelism (the reference), then under `enable_parallelism(ulysses_degree=2)`: the
output must match, and the parameter gradients summed over the ranks (each rank's cover its own
sequence shard) must match the reference's. CPU: gloo (whose `all_to_all_single` diffusers'
Ulysses exchange uses); CUDA: NCCL, one GPU per rank.
"""
from __future__ import annotations

import socket
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from test_diffusers_plugins import tiny_wan, wan_inputs  # noqa: E402

from zoo.diffusers import (  # noqa: E402
    NeighborhoodAttentionConfig,
    RadialAttentionConfig,
    SLAConfig,
    apply_attention,
    attention_report,
    remove_attention,
)

WORLD = 2
# the first layer dense: it runs the stock processor, i.e. diffusers' own Ulysses attention, beside the sparse one
CONFIGS = (RadialAttentionConfig(block_size=8, decay_factor=0.5, dense_layers=1),
           NeighborhoodAttentionConfig(kernel_size=3, dense_layers=1),
           SLAConfig(topk=0.3, block_size=16, dense_layers=1))
# float32: the shards' linears and the exchanged attention sum in another order than one process does
TOL = dict(atol=1e-5, rtol=1e-4)


def forward_backward(model, inputs, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
    (out * weight).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def worker(rank: int, port: int, backend: str) -> None:
    import os

    from diffusers import ContextParallelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in wan_inputs().items()}
        for config, plugin_first in zip(CONFIGS, (True, False, True)):
            model = tiny_wan().train().to(device)  # train mode with autograd: every layer past the dense one is sparse
            apply_attention(model, config)
            expected, expected_grads = forward_backward(model, inputs, device)
            single = attention_report(model)
            if not plugin_first:  # the plugin applied to a model already parallel: it reads the stock's config
                remove_attention(model)
            # diffusers 0.42.1 picks the rank's device as `rank % torch.accelerator.device_count()`, which is a
            # division by zero on a host without an accelerator; everything after that runs on CPU with gloo
            with mock.patch("torch.accelerator.device_count", return_value=1) if backend == "gloo" else nullcontext():
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
            if plugin_first:
                attention_report(model, reset=True)
            else:
                apply_attention(model, config)
            out, grads = forward_backward(model, inputs, device)
            torch.testing.assert_close(out, expected, **TOL, msg=lambda m, kind=config.kind: f"{kind} output: {m}")
            assert grads.keys() == expected_grads.keys()
            for name, grad in grads.items():
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, expected_grads[name], **TOL, msg=lambda m, what=f"{config.kind} {name}": f"{what}: {m}")
            # each rank counts its own head; the geometry is the full latent's (SLA: 3 of 10 full key blocks per row)
            report = attention_report(model)
            assert (report.sparse_calls, report.dense_calls, report.grid) == (1, 1, (5, 4, 8))
            assert report.skipped_fraction == pytest.approx(single.skipped_fraction, abs=1e-12)
            assert 0.1 < report.skipped_fraction < 0.9, (config.kind, report)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes importing torch and diffusers: ~15 s
def test_ulysses_context_parallel_on_cpu_equals_one_process():
    assert dist.is_gloo_available()
    mp.spawn(worker, args=(free_port(), "gloo"), nprocs=WORLD)


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ulysses_context_parallel_on_two_gpus_equals_one_gpu():
    mp.spawn(worker, args=(free_port(), "nccl"), nprocs=WORLD)
