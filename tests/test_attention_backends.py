"""The registry of DiT attention backends (`zoo.dit.attention`): every backend builds, checks its options with
one-line errors and reports the share of attention it skips; a backend of one's own registers and runs in a VideoDiT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from zoo.dit import AttentionBackend, VideoDiT, attention, attention_backends, get_backend, register_backend

GRID = (4, 4, 4)  # frames, height, width: 64 tokens, 16 per frame
N = math.prod(GRID)
# each built-in backend with options that make it sparse on GRID (radial: blocks of one frame)
SPARSE_OPTIONS = {
    "dense": {},
    "radial": dict(block_size=16, decay_factor=1.0, dense_layers=1),
    "sla": dict(topk=0.5, block_size=16),
    "na": dict(kernel_size=(3, 3, 2), stride=(1, 2, 1)),
}
TINY = dict(input_size=(4, 8, 8), in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def test_every_registered_backend_is_covered_here():
    assert attention_backends() == tuple(SPARSE_OPTIONS)  # the built-in ones, in their registration order
    assert all(get_backend(name).name == name for name in attention_backends())


@pytest.mark.parametrize("name", list(SPARSE_OPTIONS))
def test_skipped_fraction_is_what_the_backend_leaves_out(name):
    """With v the identity (head_dim = tokens) the output is the attention matrix itself: its zeros are the skipped pairs."""
    backend = attention.build_backend(name, head_dim=N, grid=GRID, layer_index=1, options=SPARSE_OPTIONS[name])
    assert isinstance(backend, get_backend(name))
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, N, N, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    v = torch.eye(N, dtype=torch.float64)[None, None]
    probs = backend.double()(q, k, v, GRID)[0, 0]  # SLA: proj_l starts at zero, so this is its exact top-k branch
    torch.testing.assert_close(probs.sum(-1), torch.ones(N, dtype=torch.float64))
    skipped = 1 - torch.count_nonzero(probs).item() / N**2
    assert backend.skipped_fraction(GRID) == pytest.approx(skipped, abs=1e-12)
    if name == "dense":
        torch.testing.assert_close(probs, torch.softmax(q[0, 0] @ k[0, 0].T / math.sqrt(N), -1))
    else:
        assert skipped > 0.2


def test_radial_dense_layers_skip_nothing():
    first = attention.build_backend("radial", head_dim=16, grid=GRID, layer_index=0, options=SPARSE_OPTIONS["radial"])
    assert first.skipped_fraction(GRID) == 0.0  # dense_layers=1: block 0 is dense


@pytest.mark.parametrize("name, options, grid, named", [
    ("dense", dict(window=3), GRID, "window"),
    ("radial", dict(decay_factor=-1.0), GRID, "decay_factor"),
    ("radial", dict(dense_timesteps=-1), GRID, "dense_timesteps"),
    ("radial", dict(block_size=0), GRID, "block_size"),
    ("radial", dict(mask_model="cogvideo"), GRID, "mask_model"),
    ("radial", {}, (4, 4), "video"),
    ("sla", dict(topk=2.0), GRID, "topk"),
    ("sla", dict(top_k=0.1), GRID, "top_k"),
    ("na", {}, GRID, "kernel_size"),
    ("na", dict(kernel_size=(3, 3)), GRID, "kernel_size"),
    ("na", dict(kernel_size=3, stride=4), GRID, "stride"),
    ("na", dict(kernel_size=3, dilation=0), GRID, "dilation"),
])
def test_bad_options_are_refused_before_building_with_one_line(name, options, grid, named):
    with pytest.raises(ValueError) as direct:
        get_backend(name).check_options(options, 16, grid)
    with pytest.raises(ValueError) as built:
        attention.build_backend(name, head_dim=16, grid=grid, layer_index=0, options=options)
    for message in (str(direct.value), str(built.value)):
        assert named in message and "\n" not in message
    assert str(built.value).startswith(f"attention={name!r}: ")


def test_unknown_backend_lists_the_registered_ones_and_options_must_be_a_dict():
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose one of dense, radial, sla, na$"):
        VideoDiT(**TINY, attention="flash")
    with pytest.raises(ValueError, match="attention_kwargs must be a dict of attention='na'.s options, got list"):
        VideoDiT(**TINY, attention="na", attention_kwargs=[3, 3, 3])


# ---- a backend of one's own ---------------------------------------------------------------------

class FrameWindows(AttentionBackend):
    """Dense attention inside windows of `window` consecutive frames (a video-only backend with a checked option)."""

    name = "frame_windows"
    options = ("window",)

    def __init__(self, window: int = 1):
        super().__init__()
        self.window = window

    @classmethod
    def check_options(cls, options, head_dim, grid):
        super().check_options(options, head_dim, grid)
        window = cls.with_defaults(options)["window"]
        if len(grid) != 3 or not isinstance(window, int) or window < 1 or grid[0] % window:
            raise ValueError(f"window must be an int >= 1 that divides the {grid[0]} latent frames, got {window!r}")

    def forward(self, q, k, v, grid, step_index=None):
        b, h, n, d = q.shape
        windows = grid[0] // self.window

        def split(t):
            return t.reshape(b, h * windows, n // windows, t.shape[-1])

        return F.scaled_dot_product_attention(split(q), split(k), split(v)).reshape(b, h, n, v.shape[-1])

    def skipped_fraction(self, grid):
        return 1 - self.window / grid[0]


@pytest.fixture
def own_backend(monkeypatch):
    """FrameWindows registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(attention, "_BACKENDS", dict(attention._BACKENDS))
    return register_backend(FrameWindows)


def test_an_own_backend_registers_builds_in_a_video_dit_and_runs(own_backend):
    from zoo.cli.generate import attention_sparsity

    assert attention_backends()[-1] == "frame_windows"
    torch.manual_seed(0)
    dense = VideoDiT(**TINY).eval()
    with torch.no_grad():  # past adaLN-Zero's zero init, so attention shows in the output
        for p in dense.parameters():
            p.normal_(0, 0.2)
    whole = VideoDiT(**TINY, attention="frame_windows", attention_kwargs=dict(window=4)).eval()
    pairs = VideoDiT(**TINY, attention="frame_windows", attention_kwargs=dict(window=2)).eval()
    whole.load_state_dict(dense.state_dict())  # no weights of its own: every checkpoint key is kept
    pairs.load_state_dict(dense.state_dict())
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([100.0, 800.0]), torch.tensor([1, 7])
    torch.testing.assert_close(whole(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)  # one window = dense
    assert not torch.allclose(pairs(x, t, y), dense(x, t, y), atol=1e-4)
    assert isinstance(pairs.blocks[0].attn.backend, FrameWindows)
    assert attention_sparsity(pairs) == "50.0% of attention skipped (mean over 2 layers)"
    with pytest.raises(ValueError, match=r"^attention='frame_windows': window must be an int >= 1 that divides the 4 latent"):
        VideoDiT(**TINY, attention="frame_windows", attention_kwargs=dict(window=3))


def test_the_cli_runs_an_own_backend(own_backend, capsys, tmp_path):
    from zoo.cli import main

    code = main(["generate-video", "--model", "video_dit_tiny", "--random-init", "--model-arg", "in_channels=1", "--steps", "1",
                 "--attention", "frame_windows", "--model-arg", "attention_kwargs={window: 2}", "--out", str(tmp_path / "v.gif")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "attention frame_windows: 50.0% of attention skipped (mean over 2 layers)" in err


def test_registration_refuses_what_cannot_work(own_backend):
    with pytest.raises(ValueError, match="registered twice"):
        register_backend(FrameWindows)

    class NoSkippedFraction(AttentionBackend):
        name = "incomplete"

        def forward(self, q, k, v, grid, step_index=None):
            return q

    with pytest.raises(TypeError, match="must define skipped_fraction"):
        register_backend(NoSkippedFraction)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_backend(type("Spaced", (FrameWindows,), {"name": "two words"}))
    with pytest.raises(TypeError, match="AttentionBackend subclass"):
        register_backend(torch.nn.Identity)
    assert "incomplete" not in attention_backends()


@pytest.mark.parametrize("name, op", [("radial", "radial_block_mask"), ("sla", "SparseLinearAttention"), ("na", "na3d")])
def test_a_backend_whose_op_is_missing_names_it(monkeypatch, name, op):
    from zoo import ops

    monkeypatch.delattr(ops, op)
    with pytest.raises(ImportError, match=rf"attention='{name}' needs zoo.ops.{op}, which this install of zoo lacks"):
        attention.build_backend(name, head_dim=16, grid=GRID, layer_index=0, options=SPARSE_OPTIONS[name])
