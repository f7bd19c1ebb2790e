"""Channel pruning through a :class:`~autocompress.techniques.heads.HeadAttention`.

torch-pruning knows ``nn.MultiheadAttention``; the module heads pruning puts in its place is new to it.
Removing channels of the model's width (the residual stream a transformer's attention reads and writes)
must remove the matching input columns of the packed query/key/value projection and the output rows of
``out_proj``; the heads and their width stay. Registered with :mod:`.structured` as the pruner of
``HeadAttention`` (torch-pruning then leaves the module's children to it).
"""

from __future__ import annotations

from . import structured
from .heads import HeadAttention


def _keep(n: int, idxs) -> list[int]:
    return sorted(set(range(n)) - set(int(i) for i in idxs))


def head_attention_pruner():
    """A torch-pruning ``BasePruningFunc`` for :class:`HeadAttention` (built when torch-pruning is
    first needed: it is imported lazily)."""
    tp = structured._tp()

    class HeadAttentionPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: HeadAttention, idxs: list) -> HeadAttention:
            keep = _keep(layer.embed_dim, idxs)
            layer.in_proj_weight = self._prune_parameter_and_grad(layer.in_proj_weight, keep, 1)
            out = layer.out_proj
            out.weight = self._prune_parameter_and_grad(out.weight, keep, 0)
            if out.bias is not None:
                out.bias = self._prune_parameter_and_grad(out.bias, keep, 0)
            out.out_features = layer.embed_dim = len(keep)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: HeadAttention) -> int:
            return layer.embed_dim

        get_in_channels = get_out_channels

    return HeadAttentionPruner()


structured.CUSTOM_PRUNERS[HeadAttention] = head_attention_pruner
