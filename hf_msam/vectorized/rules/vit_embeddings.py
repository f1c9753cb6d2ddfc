"""transformers' ViTEmbeddings: the class token and the position embeddings ([1, 1, H], [1, P + 1, H]; the mask
token [1, 1, H] when there is one) enter by broadcasting over the batch's rows (`cls_token.expand(B, -1, -1)`,
`embeddings + position_embeddings`), so the layer runs once with each row's own p + e_j (`Rule.per_row`):

    y_i = ViTEmbeddings(x_i; p + e_j)   for row i of group j,   g_p,j = Σ_{i∈B_j} ∂L/∂p_i   (through zero probes)

The patch projection inside is a Conv2d with its own rule. Interpolated position encodings reshape the embeddings
to one row, and fail here: the step then runs one pass per micro-batch."""

from __future__ import annotations

from ..registry import Rule, register_rule


def _through_probes(*args, **kwargs):
    raise NotImplementedError("a per_row rule's group gradients come through probes")


try:
    from transformers.models.vit.modeling_vit import ViTEmbeddings
except ImportError:  # transformers is a dependency, but the rules do not need it
    pass
else:
    register_rule(ViTEmbeddings, Rule(("cls_token", "position_embeddings", "mask_token"), _through_probes,
                                       _through_probes, per_row=True))  # fmt: skip
