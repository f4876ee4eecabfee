"""scripts/benchmark.py on a CPU-only machine: it imports, parses its arguments, and its routing check holds."""
import pytest
import torch
from script_modules import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark")


@pytest.mark.parametrize("n_win,topk,heads,head_dim", [(2, 2, 2, 4), (3, 4, 1, 8)])
def test_routing_check_ours_matches_official_gather(bench, n_win, topk, heads, head_dim):
    """The benchmark's own correctness check (float32, CPU): same routing, outputs and gradients."""
    side = 3 * n_win  # 3 x 3 token regions
    scale = (heads * head_dim) ** -0.5  # the released models' full-width scale
    check = bench.check_routing(2, side, heads, head_dim, n_win, topk, scale, "cpu", torch.float32, seed=3)
    assert check["routing_match"] == 1.0
    assert check["max_abs_out"] < 1e-5
    assert check["max_abs_grad"] < 1e-5


def test_official_gather_reference(bench):
    """The gather reference equals ours at top-1, and plain dense attention when every region is routed."""
    q, k, v = (torch.randn(1, 4, 4, 1, 4, generator=torch.Generator().manual_seed(s)) for s in range(3))
    out, idx = bench.official_gather_bra(q, k, v, 2, 1, 0.5)
    ours, routing = bench.ours_bra(q, k, v, 2, 1, 0.5)
    torch.testing.assert_close(out, ours)
    torch.testing.assert_close(idx, routing)
    out_all, _ = bench.official_gather_bra(q, k, v, 2, 4, 0.5)  # every region: dense attention over all tokens
    dense = torch.softmax(0.5 * q.reshape(16, 4) @ k.reshape(16, 4).T, -1) @ v.reshape(16, 4)
    torch.testing.assert_close(out_all.reshape(16, 4), dense)
    with pytest.raises(ValueError, match="divisible by n_win"):
        bench.official_gather_bra(q[:, :3], k[:, :3], v[:, :3], 2, 1, 0.5)


def test_biformer_small_routed_stage_shapes(bench):
    """Per-stage shapes come from the registered model: heads dim/32, topk 1/4/16, full-width scale."""
    at224 = bench.biformer_routed_stages(224, 7)
    assert [(s["stage"], s["layers"], s["side"], s["heads"], s["head_dim"], s["topk"], s["region_tokens"])
            for s in at224] == [(1, 4, 56, 2, 32, 1, 64), (2, 4, 28, 4, 32, 4, 16), (3, 18, 14, 8, 32, 16, 4)]
    assert at224[0]["scale"] == pytest.approx(64 ** -0.5)
    at1024 = bench.biformer_routed_stages(1024, 16)
    assert [(s["side"], s["region_tokens"]) for s in at1024] == [(256, 256), (128, 64), (64, 16)]


def test_parse_args_on_cpu(bench):
    args = bench.parse_args([])
    assert args.mask == ["radial", "dense"] and args.radial_mask == "exact" and args.routing is None
    args = bench.parse_args(["--routing", "224", "--routing", "1024", "--modes", "fwd"])
    assert args.mask == [] and args.routing == [224, 1024] and args.modes == ["fwd"] and not args.cuda_graph
    assert bench.parse_args(["--routing", "224", "--cuda-graph"]).cuda_graph
    assert bench.parse_args(["--radial-mask", "reconstructed"]).radial_mask == "reconstructed"
    with pytest.raises(SystemExit):
        bench.parse_args(["--text-tokens", "256"])  # Wan has no text tokens in self-attention
    assert bench.parse_args(["--shape", "hunyuan720", "--text-tokens", "256"]).text_tokens == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_main_refuses_without_cuda(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--routing", "224"])


@pytest.mark.parametrize("shape,model,blocks", [("wan480", "wan", 256), ("hunyuan720", "hunyuan", 929)])
def test_exact_radial_mask_is_the_ops_mask(bench, shape, model, blocks):
    """--radial-mask exact (the default) is zoo.ops.radial_block_mask of the shape's frames x tokens."""
    from zoo.ops import radial_block_mask

    args = bench.parse_args(["--shape", shape])
    _, _, frames, per_frame, _ = bench.SHAPES[shape]
    mask = bench.radial_mask(args, frames, per_frame, device="cpu")
    assert mask.shape == (blocks, blocks)
    assert torch.equal(mask, radial_block_mask(frames, per_frame, 0.2, 128, model=model))


def test_routing_run_and_host_time_on_cpu(bench):
    """The forward closure the routing rows time (and time for host launches) runs ours and the official algorithm."""
    q, k, v = (torch.randn(1, 14, 14, 2, 32) for _ in range(3))
    st = {"n_win": 7, "topk": 4, "scale": 64 ** -0.5}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for fn in (bench.ours_bra, bench.official_gather_bra):
        assert bench.host_ms(bench.routing_run(fn, "fwd", (q, k, v), leaves, torch.randn_like(q), st), calls=2) > 0
        bench.routing_run(fn, "fwdbwd", (q, k, v), leaves, torch.randn_like(q), st)()  # autograd.grad inside
