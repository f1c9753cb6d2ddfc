"""Every micro-batch's gradient, and every micro-batch's perturbed pass, in one forward and one backward.

mSAM cuts a device batch into k groups B_1..B_k (micro-batches) and needs, for each trainable parameter w,

    (1)  g_j = Σ_{i∈B_j} ∂ℓ_i/∂w (w)                   every group's own gradient, j = 1..k
    (2)  Σ_j Σ_{i∈B_j} ∂ℓ_i/∂w (w + e_j)               the descent pass: group j's positions see w + e_j

where i runs over positions (rows of the batch, or tokens of a packed row) and ℓ_i is position i's share of the
loss. The plain engine takes 2k passes for this; here each takes one forward and one backward over the whole batch.

**Per-group gradients (1).** A layer y = f(x; w) applied position by position has the gradient
∂L/∂w = Σ_i J_w f(x_i; w)ᵀ δ_i, with δ_i = ∂L/∂y_i its output gradient: a sum over positions of terms that
need only the layer's input and output gradient. Summing over the positions of each group instead of over all of them
gives g_j. So `Vectorizer.capture` records each layer call's input and the autograd edge of its output, and
`Capture.group_gradients` asks autograd for the δ of every recorded output (never for the weights' gradients:
`.grad` is untouched) and contracts per group, one rule per layer type (`Rule.group_grad`):

    nn.Linear        y = W x + b      g_W,j = Σ_{i∈B_j} δ_i x_iᵀ (one bmm over groups),  g_b,j = Σ_{i∈B_j} δ_i
    Conv1D (GPT-2)   y = xᵀ W + b     g_W,j = Σ_{i∈B_j} x_i δ_iᵀ
    nn.Embedding     y = W[id]        g_W,j[v] = Σ_{i∈B_j, id_i = v} δ_i (index_add into k·V rows)
    nn.LayerNorm     y = x̂ ⊙ γ + β    g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i,  g_β,j = Σ_{i∈B_j} δ_i  (x̂ recomputed)
    nn.RMSNorm       y = x̂ ⊙ γ        g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i
    Llama's RMSNorm  y = γ ⊙ x̂        g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i  (x̂ normalized in float32, cast to x's dtype)

The last is transformers' LlamaRMSNorm and every class whose forward is the same bytecode (Qwen2RMSNorm,
MistralRMSNorm, Qwen3RMSNorm and the many others transformers generates from Llama's code): it is chosen by what
the class's forward is, not by its name or type (`register_forward_rule`, `_computes_like_llama_rms_norm`), and
recomputes x̂ with the module's own operations, so bitwise the x̂ the module multiplies by. Gemma's RMSNorm
(x̂ ⊙ (1 + γ), rounded to x's dtype after the product) computes another formula and has no rule.

**Perturbed pass (2).** `Vectorizer.perturbed` routes each covered layer's forward so that group j's positions
see w + e_j. All the layers above are affine in their parameters, f(x; w + e) = f(x; w) + Δ(x; e), with Δ
independent of w: for Embedding, LayerNorm and nn.RMSNorm the layer runs as usual and Δ_{j(i)} is added (a row of
e_j, x̂ ⊙ e_γ,j + e_β,j). Llama's RMSNorm is computed directly as (γ + e_γ,j) ⊙ x̂, so that its input gradient
passes its float32 round trip as one product, rounded as in a pass at w + e_j. For Linear and Conv1D, Δ = e_j x_i would cost a second matmul forward and backward, so the
output is computed directly as one bmm of the group-major inputs with W + e_j; its backward gives W the sum over
groups with one matmul, as a plain layer would, and the k perturbed weights are rebuilt in the backward rather than
kept. Either way, a backward leaves in w.grad Σ_i J_w f(x_i)ᵀ δ_i, δ_i the output gradient of the perturbed
network: exactly (2). The weights are never written. (A rule that perturbs frozen weights, Flat-LoRA, routes those
layers itself for the pass, from the same `Positions`: see `PerturbationRule.perturbing_groups`.)

**Everything else** holding a trainable parameter directly (Gemma's RMSNorm, Conv2d, ViT's embeddings with their
cls_token, a custom layer), or a known layer type used in an unusual way (a subclass that overrides `forward`), is
run by a `torch.func` fallback for that module alone, its whole subtree included: its inputs are arranged by group,
`vmap` runs the module once per group through `functional_call` with parameters w + t_j, and the outputs go back to
their positions. For (2), t_j = e_j. For (1), t_j = z_j, a zero tensor of shape [k, *w.shape] that autograd
differentiates: ∂L/∂z_j is group j's gradient, from the same backward, with the same dropout masks as the forward.
Whole-model vmap fails on transformers' attention-mask code, which is why the fallback never goes above the module
that holds the parameters.

**Positions and padding.** A `GroupLayout` says which positions of the batch form group j: contiguous rows (dim 0),
preference pairs (rows a..b-1 with n+a..n+b-1), or token ranges of a packed one-row batch (dim 1). Groups are
arranged group-major as [k, r, ...], r the largest group. For the rules, a smaller group is padded with copies of
its first position (always finite inputs), and the output gradients of padding slots are zero, so padding adds
nothing: a rule computes position by position. The fallback runs a whole module, which may compute across the
positions of its call, so it never pads: with equal groups it runs one vmap over [k, r, ...]; with groups of
different sizes, one vmap per distinct size (a `Bucket` of the groups of that size, [n_b, s_b, ...], each with its
own rows t_j), whose outputs are put back at their positions. A layout with s distinct sizes costs s vmapped calls
of such a module instead of one (2 when only the last group is short; up to k for a packed batch, whose groups
rarely hold equal token counts); the buckets' indices are slices where consecutive, else index tensors built with
the layout's other ones, once per device.
A layer whose input does not carry the batch in its leading dims raises `NotVectorizable`: the caller then falls
back to one pass per group. An input of shape [1, ...] where rows are expected (BERT's and GPT-2's position ids) is
taken as broadcast over the batch: it and the layer's output are expanded to the batch (views), so that each row's
copy gets its own output gradient and its own group's perturbation.

**Activation checkpointing** (torch.utils.checkpoint, non-reentrant: transformers' default) recomputes a region's
forward in the backward to get its saved tensors back. The backwards therefore run inside the contexts, so that the
recomputation takes the routed forwards again and saves the same tensors; it records nothing
(`torch_internals.in_backward`).
Inside a region the capture does not keep the layer's input and output edge (that would keep the activations
checkpointing frees): the layer runs at w + z_j with probes z as in the fallback, and ∂L/∂z_j is g_j, computed in
the backward as it goes. Reentrant checkpointing runs its forward without autograd and refuses autograd.grad:
`why_not` refuses transformers' reentrant flag and `verify` finds a reentrant region.

**torch.compile.** The routed forwards run outside compilation (`_routed`): a compiled model breaks its graph at
each routed layer, the code between them stays compiled, and nothing is recompiled from one pass to the next.

**What it cannot see.** Rows must not meet inside the model: `why_not` refuses BatchNorm in train mode, but other
cross-row computations (a mixture-of-experts' load-balancing term, in-batch negatives) would make "group j's part"
differ from group j's own gradient. (Inside a module the fallback runs, positions meet within their group only,
exactly as in the sequential step's micro-batch, whatever the group sizes: a norm over the rows, or attention
across the rows or across the tokens of a packed row, inside such a module gives each group its own gradient.)
A weight read outside its layer's call (PEFT DoRA, `F.linear(x, child.weight)` in a parent, a penalty on the
weights) is invisible to the routed forwards: `Capture.verify` finds such reads in the autograd graph. `why_not`
reads the modules' states (train mode, checkpointing) each time it is called. `group_gradients` holds every
recorded output's gradient at once (about the size of the activations) and returns k copies of the parameters'
shapes.

Nothing here synchronizes with the host: layouts are Python ints, their index tensors are built once per device.
Rules compute in the dtype of the layer's output (bf16 under autocast, like autograd would).

Where things are: `layout` (GroupLayout, Positions), `registry` (Rule, the tables, `register_rule`,
`register_forward_rule`), `rules/` (one file per layer type, each registering itself), `matmul` (the grouped and
perturbed matmuls), `vectorizer` (Vectorizer: routing, the fallback), `capture` (Capture: group gradients, verify).
"""

from . import rules  # noqa: F401  (registers the built-in rules)
from .capture import Capture
from .layout import Bucket, GroupLayout, NotVectorizable, Positions
from .outside import OutsideCall, active, register_outside_reader
from .matmul import _compute_dtype, compute_dtype, perturbed_matmul
from .registry import FORWARD_RULES, RULES, Rule, register_forward_rule, register_rule, rule_for
from .registry import rule_for as _rule_for
from .rules.rms_norm import (
    _LLAMA_RMS_FORWARD,
    _computes_like_llama_rms_norm,
    _llama_rms_forward_key,
    llama_rms_norm_rule,
)
from .vectorizer import Vectorizer

__all__ = [
    "Capture", "GroupLayout", "NotVectorizable", "Positions", "Rule", "Vectorizer", "llama_rms_norm_rule",
    "register_forward_rule", "register_rule", "rule_for", "OutsideCall", "active", "register_outside_reader", "compute_dtype", "perturbed_matmul",
]
