"""scripts/count_block_ops.py: the op counter, and one family's block counted end to end on CPU."""
import json

import pytest
import torch
from script_modules import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("count_block_ops")


def test_counter_counts_kernels_not_views_or_allocations(script):
    x = torch.randn(4, 6)
    with script.OpCounter() as counter:
        y = x.t().reshape(24)  # a view, then a copy (the transpose is not contiguous)
        torch.empty(3)
        (y + 1).view(4, 6).sum()
    assert dict(counter.ops) == {"aten.clone": 1, "aten.add": 1, "aten.sum": 1}


def test_agent_swin_block(script, tmp_path, capsys):
    """Inference reuses the agent biases (no resize kernels), training rebuilds them; --baseline prints both."""
    out = tmp_path / "after.json"
    assert script.main(["--families", "agent_swin", "--json", str(out), "--ops", "agent_swin"]) == 0
    counts = json.loads(out.read_text())["agent_swin"]
    assert 0 < counts["forward"] < counts["train"]
    assert counts["forward"] == sum(counts["forward_ops"].values())
    assert counts["forward_ops"]["aten._scaled_dot_product_flash_attention_for_cpu"] == 2  # the SDPA path
    assert "aten.upsample_bilinear2d" not in counts["forward_ops"]
    assert counts["train_ops"]["aten.upsample_bilinear2d"] == 2
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"agent_swin": dict(counts, forward=counts["forward"] + 9)}))
    capsys.readouterr()
    script.main(["--families", "agent_swin", "--baseline", str(before)])
    assert f"{counts['forward'] + 9} -> {counts['forward']}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--families", "agent_swim"])
