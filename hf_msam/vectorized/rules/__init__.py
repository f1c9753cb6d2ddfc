"""The layer rules, one file each; importing this package registers them (`hf_msam.vectorized.registry`).

    linear.py        nn.Linear, GPT-2's Conv1D     y = W x + b
    embedding.py     nn.Embedding                  y = W[id]
    layer_norm.py    nn.LayerNorm, nn.RMSNorm      y = x̂ ⊙ γ (+ β)
    rms_norm.py      Llama-style RMSNorm           y = γ ⊙ x̂, x̂ normalized in float32 (chosen by its forward's code)
"""

from . import embedding, layer_norm, linear, rms_norm  # noqa: F401
