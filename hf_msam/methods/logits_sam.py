"""logits-SAM (Luo et al., "Sharpness-aware minimization in logit space efficiently enhances direct preference
optimization", ICLR 2026, arXiv 2603.18258): SAM on the output layer alone.

For micro-batch j, with W the output layer's weight (the LM head) and everything below it the body:

    g_j = ∂L_j/∂W                          the output layer's weight only, from its input h and its output gradient
                                           (g_j = Σ_i δ_i h_iᵀ): no backward through the body
    e_j = ρ · g_j / (‖g_j‖ + ε)            the norm over W alone; the bias is not perturbed
    ∇  += c_j · ∇L_j(body at w, W + e_j)    every parameter, body and head, with the head at W + e_j

Perturbing only the last linear map moves the logits along their sharpest directions, which the paper finds drives
DPO's "squeezing effect"; the body's forward and backward run once per micro-batch (once per group of micro-batches
on the vectorized step), so the extra cost is the output layer's: a second matmul forward, its weight gradient at W,
and the softmax once more (see `hf_msam.engine.head`).

The output layer is the model's output embeddings (`get_output_embeddings()`, under PEFT of the base model) for a
language model, else the last `nn.Linear` outside the body (`model.base_model`), e.g. a sequence classifier's
`classifier`. With tied input and output embeddings, g_j is the gradient of the output use alone and only the output
use sees e_j. A frozen head (LoRA) is perturbed but not updated, as in the paper's code.

`--msam_adaptive` scales the gradient by |W| elementwise before normalizing, as the paper's code does:
e_j = ρ · (|W| ⊙ g_j) / (‖|W| ⊙ g_j‖ + ε) (once, and without η: not ASAM's T²g/‖Tg‖).
"""

from __future__ import annotations

from torch import nn

from ..ops import global_norm, group_norms, scale_groups_to_radius, scale_to_radius, usable
from .base import PerturbationRule
from .registry import MEASURED, register_method
from .sam import SAMDescent

__all__ = ["LogitsSAMPerturbation", "body_of", "output_layer", "unwrapped"]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP's, torch.compile's and PEFT's wrappers (the transformers model, for one)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def body_of(model: nn.Module) -> nn.Module | None:
    """The body: `base_model` of the (unwrapped) transformers model, None when it has none other than itself."""
    inner = unwrapped(model)
    body = getattr(inner, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not inner else None


def output_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(its name, the module) of the output layer: the output embeddings of a language model, else the last
    nn.Linear outside the body. Raises ValueError, saying what was looked for, when there is none."""
    inner = unwrapped(model)
    names = {id(m): n for n, m in inner.named_modules()}
    head = None
    getter = getattr(inner, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    if not isinstance(head, nn.Module):
        body = body_of(model)
        inside = set() if body is None else {id(m) for m in body.modules()}
        linear = [m for m in inner.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
        head = linear[-1] if linear else None
    if head is None:
        raise ValueError(
            f"--msam_method logits_sam perturbs the output layer, and {type(inner).__name__} has none it can find: no "
            "output embeddings (get_output_embeddings()) and no nn.Linear outside its body (base_model)."
        )
    if type(head) is not nn.Linear:
        raise ValueError(
            f"--msam_method logits_sam perturbs the output layer {names.get(id(head), '?')} "
            f"({type(head).__name__}), which is not a plain nn.Linear (a LoRA layer on the head, or a custom layer): "
            "keep the head a plain nn.Linear (PEFT: leave it out of target_modules), or use another --msam_method."
        )
    return names.get(id(head), "?"), head


class LogitsSAMPerturbation(PerturbationRule):
    """e = ρ·g/(‖g‖ + eps) on the output layer's weight alone (`scope` "head": the engine hands this rule the head's
    weight and its gradient only, and runs `hf_msam.engine.head`'s strategy). With `adaptive`, g ← |W| ⊙ g first, as
    the paper's code does (no η, no second factor)."""

    scope = "head"
    supports_fsdp2 = False  # the head's gradient from its input needs the whole weight: refused under FSDP2
    capability_notes = {"fsdp2": "it reads the output layer's whole weight and its input, which FSDP2 shards"}

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12):
        self.rho, self.adaptive, self.eps = rho, adaptive, eps

    @property
    def enabled(self) -> bool:
        return self.rho != 0

    def __repr__(self) -> str:
        return f"LogitsSAMPerturbation(rho={self.rho}{', adaptive=True' if self.adaptive else ''}, eps={self.eps})"

    def check_model(self, model) -> None:
        output_layer(model)  # raises when the model has no output layer to perturb

    def perturb(self, params, grads, rho=None):
        if self.adaptive:  # g ← |W| ⊙ g
            for p, g in zip(params, grads):
                g.mul_(p.detach().abs())
        norm = global_norm(grads)
        ok = usable(norm)
        return scale_to_radius(grads, norm, self.rho if rho is None else rho, self.eps, ok), norm, ok

    def perturb_groups(self, params, grads, rho=None):
        # The same for g stacked [k, ...]: |W| broadcasts over j.
        if self.adaptive:
            for p, g in zip(params, grads):
                g.mul_(p.detach().abs())
        norms = group_norms(grads)
        ok = usable(norms)
        return scale_groups_to_radius(grads, norms, self.rho if rho is None else rho, self.eps, ok), norms, ok


@register_method("logits_sam", paper="logits-SAM, Luo et al., ICLR 2026, arXiv 2603.18258",
                 cost=("1 pass of the body per micro-batch (vectorized: per group), the output layer twice; 1.00x a plain step on a "
                       "tiny Llama, 1.28x at hidden 256 and vocabulary 8,000" + MEASURED),
                 flags=("msam_rho", "msam_adaptive", "msam_eps"))
def build(args):
    if args.msam_precondition != "none":
        raise ValueError(
            f"--msam_precondition {args.msam_precondition} does not combine with --msam_method logits_sam: its ascent "
            "is the output layer's own gradient, which the optimizer's second moment would not precondition exactly. "
            "Drop --msam_precondition, or use --msam_method sam or functional."
        )
    return LogitsSAMPerturbation(args.msam_rho, args.msam_adaptive, args.msam_eps), SAMDescent()
