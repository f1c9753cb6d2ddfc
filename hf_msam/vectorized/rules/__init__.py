"""The layer rules, one file each; importing this package registers them (`hf_msam.vectorized.registry`).

    linear.py        nn.Linear, GPT-2's Conv1D     y = W x + b
    embedding.py     nn.Embedding                  y = W[id]
    layer_norm.py    nn.LayerNorm, nn.RMSNorm      y = x̂ ⊙ γ (+ β)
    rms_norm.py      Llama-style RMSNorm           y = γ ⊙ x̂, x̂ normalized in float32 (chosen by its forward's code)
    conv.py          nn.Conv2d                     y = W ⋆ x + b, the k groups as the convolution's groups
    vit_embeddings.py  transformers' ViTEmbeddings   class token and positions broadcast over rows: run per row
"""

from . import conv, embedding, layer_norm, linear, rms_norm, vit_embeddings  # noqa: F401
