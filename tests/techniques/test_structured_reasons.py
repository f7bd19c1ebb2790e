"""Why a layer planned for structured pruning was not pruned: the reason says what really happened."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress import Task
from autocompress.errors import TechniqueError
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.techniques.structured import prune_channels


class _Attention(nn.Module):
    """An embedding, one nn.MultiheadAttention with a residual, a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class _Mixer(nn.Module):
    """Channel mixing, then token mixing across a transpose (an MLP-Mixer's block, smallest form)."""

    def __init__(self):
        super().__init__()
        self.channel = nn.Linear(8, 16)
        self.token = nn.Linear(4, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.channel(x)
        x = x + self.token(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x.mean(1))


def test_a_layer_left_unchanged_is_not_said_to_produce_the_output():
    torch.manual_seed(0)
    x = torch.randn(32, 4, 6)
    model = _Attention().eval()
    task = Task(name="att", model=model, train=(x, model(x).argmax(1)), test=(x, model(x).argmax(1)))
    structured = LayerPlan(bits=32, sparsity=0.5, sparsity_kind="structured")
    plan = Plan(layers={"attn.out_proj": structured, "head": structured}, epochs=0)
    notes = compress(task, task.teacher(), plan).notes
    assert notes["head"] == "structured: not pruned (the layer produces the model output)"
    # the attention's output projection is not the model's output: torch-pruning keeps it whole
    assert notes["attn.out_proj"] == "structured: not pruned (torch-pruning left the layer as is)"
    plan.layers["embed"] = structured  # with the embedding, the residual's group is pruned together
    notes = compress(task, task.teacher(), plan).notes
    assert notes["embed"] == "structured: output channels 8 -> 4"
    assert notes["attn.out_proj"] == "structured: output channels 8 -> 4"


@pytest.mark.parametrize("layer", ["channel", "token"])
def test_torch_pruning_lost_across_a_transpose_says_what_and_why(layer):
    model = _Mixer().eval()
    with pytest.raises(
        TechniqueError,
        match=rf"structured pruning of {layer}: torch-pruning could not follow the channels through the "
        r"model's graph \(IndexError: .*\); an axis reshaped or transposed between layers",
    ):
        prune_channels(model, (torch.randn(2, 4, 8),), {layer: 0.5})


class _Pooled(nn.Module):
    """A residual stream whose mean is the output (a sentence embedding): no layer returns it as is."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        h = self.embed(x)
        return (h + self.mlp(h)).mean(1)


def test_pruning_that_reaches_a_pooled_output_is_refused_with_the_reason():
    """Pruning the stream's channels would change the embedding's width (8 -> 4): a trial that did so
    failed later with a broadcast error against the teacher's embedding."""
    model = _Pooled().eval()
    x = torch.randn(2, 4, 6)
    with pytest.raises(TechniqueError, match=r"embed, mlp changed the model's output shape \[\[2, 8\]\] -> "):
        prune_channels(model, (x,), {"embed": 0.5, "mlp": 0.5})
