"""nn.Embedding (y = W[id]): g_W,j[v] = Σ_{i∈B_j, id_i = v} δ_i (one index_add into k·V rows); the perturbed pass
adds row id_i of e_j."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..registry import Rule, register_rule


def _embedding_refuse(module: nn.Embedding) -> str | None:
    if module.max_norm is not None:
        return "max_norm renormalizes the weight in place during the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales by token counts over the whole batch, not per group"
    return None


def _embedding_group_grad(module, ids, delta, pos, wanted):
    vocab, dim = module.num_embeddings, delta.shape[-1]
    rows = (ids + pos.group_ids(ids.dim()) * vocab).reshape(-1)  # row id_i of group j is row j·V + id_i of [k·V, d]
    d = delta.reshape(-1, dim)
    if module.padding_idx is not None:  # the padding row gets no gradient
        d = d * (ids != module.padding_idx).reshape(-1, 1).to(d.dtype)
    g = d.new_zeros(pos.k * vocab, dim).index_add_(0, rows, d)
    return {"weight": g.view(pos.k, vocab, dim)}


def _embedding_delta(module, ids, out, e, pos):
    vocab = module.num_embeddings
    rows = ids + pos.group_ids(ids.dim()) * vocab
    # The forward reads row padding_idx like any other, so w + e_j reads e_j's row there too.
    return F.embedding(rows, e["weight"].to(out.dtype).flatten(0, 1))


register_rule(nn.Embedding, Rule(("weight",), _embedding_group_grad, _embedding_delta, _embedding_refuse))
