"""FLOP handles: SDPA and the zoo ops' own counts, against hand counts."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.ops import block_sparse_attention

import zoo


class Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class BlockSparse(nn.Module):
    def __init__(self, mask, block):
        super().__init__()
        self.mask, self.block = mask, block

    def forward(self, q, k, v):
        return block_sparse_attention(q, k, v, block_mask=self.mask, block_size=self.block)


def test_sdpa_handle_matches_hand_count():
    b, h, nq, nk, d, dv = 2, 3, 7, 11, 16, 8
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, dv)
    assert zoo.flops(Attend(), inputs=(q, k, v)) == b * h * nq * nk * (d + dv)


def test_block_sparse_counts_only_computed_blocks():
    # 10 queries / 10 keys in blocks of 4: blocks of 4, 4, 2 rows and columns
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)[None, None]
    d = 8
    q = k = v = torch.randn(1, 2, 10, d)
    rows, cols = [4, 4, 2], [4, 4, 2]
    pairs = sum(rows[i] * cols[j] for i in range(3) for j in range(3) if mask[0, 0, i, j])
    assert zoo.flops(BlockSparse(mask, 4), inputs=(q, k, v)) == 2 * pairs * (d + d)


def test_linear_layers_still_counted_alongside():
    model = nn.Sequential(nn.Linear(16, 32))
    assert zoo.flops(model, inputs=(torch.randn(1, 5, 16),)) == 5 * 16 * 32


def test_counting_leaves_normal_results_untouched():
    q = torch.randn(1, 1, 9, 4)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    out = block_sparse_attention(q, q, q, block_mask=mask, block_size=3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


def test_counting_prints_no_deprecation_warning_of_fvcore():
    """fvcore's import scripts a loss with torch.jit (deprecated): `zoo.flops` must not pass that warning to the user."""
    import subprocess
    import sys

    code = "import torch, zoo; zoo.flops(torch.nn.Linear(2, 2), inputs=(torch.randn(1, 2),))"
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
