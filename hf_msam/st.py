"""sentence-transformers: `SentenceTransformerTrainer` with `MSAMMixin` in front (or through `hf-msam run`).

What the loss does decides the step, read off its class (only sentence-transformers' own classes, exactly; a
subclass may change what its `forward` computes):

- a mean over examples (SoftmaxLoss, CosineSimilarityLoss, ...): the whole batch's loss is the size-weighted sum of
  its micro-batches' losses, and the ordinary mSAM step is exact;
- a loss that compares the examples of the batch with each other (MultipleNegativesRankingLoss's in-batch
  negatives, CoSENT's pairs, batch-hard triplets) and is computed from the embeddings alone
  (`compute_loss_from_embeddings`): with micro-batches, the loss and the descent stay the whole batch's, every
  micro-batch's rows embedded at its own w + e_j (`MicroBatchSAM.backward_whole_batch`);
- a loss that runs its own backward pass (the Cached* losses, GradCache): refused, since mSAM could neither take
  its ascent gradient nor perturb it; the whole-batch step above already keeps one micro-batch's activations alive
  at a time, so the plain loss with micro-batches takes its place;
- a wrapper of sentence-transformers around one of the losses above (`MatryoshkaLoss`: the wrapped loss at several
  truncated embedding sizes, weighted): what the wrapped loss is, when the wrapper computes the same terms at every
  call (all of its dimensions, `n_dims_per_step` -1); for in-batch negatives the whole-batch step computes every
  term from the batch's embeddings, truncated and normalized as the wrapper does;
- any other loss with micro-batches: each micro-batch's loss is computed on its own, which for a loss comparing
  examples means only within the micro-batch; said once at start-up, with the reason when it is a wrapper.

Parameters a loss owns (SoftmaxLoss's classifier) are trained by the sentence-transformers trainer; mSAM perturbs
them too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .batches import batch_size_of
from .integrations.hooks import TrainerIntegration, register_integration

logger = logging.getLogger("hf_msam")

__all__ = ["is_sentence_transformers_trainer", "loss_kind", "losses_of", "sentence_transformers_losses", "st_decomposable"]


def sentence_transformers_losses():
    """sentence-transformers' `losses` module: `sentence_transformers.sentence_transformer.losses` (6.3 and later;
    importing `sentence_transformers.losses` there warns that it is deprecated), `sentence_transformers.losses` in
    older releases."""
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses
    return losses

# Means over the examples of the batch: Σ_j c_j·L(B_j) with c_j = n_j / n is the batch's loss.
_MEANS = {
    "SoftmaxLoss", "CosineSimilarityLoss", "MSELoss", "MarginMSELoss", "TripletLoss", "ContrastiveLoss",
    "DistillKLDivLoss",
}
# Compare examples within the batch, and compute the loss from the columns' embeddings: forward(features, labels) is
# compute_loss_from_embeddings(embeddings of each column, labels).
_WHOLE_BATCH = {
    "MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "CoSENTLoss", "AnglELoss",
    "OnlineContrastiveLoss", "BatchAllTripletLoss", "BatchHardTripletLoss", "BatchHardSoftMarginTripletLoss",
    "BatchSemiHardTripletLoss",
}


# Losses of sentence-transformers that wrap another loss (`.loss`) and add up its value over variants of the
# embeddings: what they are follows from the wrapped loss when every call computes the same terms.
_TRUNCATING_WRAPPERS = {"MatryoshkaLoss"}  # the wrapped loss at truncated, re-normalized sentence embeddings
_LAYER_WRAPPERS = {"AdaptiveLayerLoss", "Matryoshka2dLoss"}  # the wrapped loss at the outputs of inner layers


def _is_st_class(loss: nn.Module, names: set[str]) -> bool:
    cls = type(loss)
    return cls.__module__.split(".")[0] == "sentence_transformers" and cls.__name__ in names


def _wrapper_problem(loss: nn.Module) -> str | None:
    """Why hf-msam cannot treat a wrapper loss as its wrapped loss, or None (not a wrapper, or one it can)."""
    name = type(loss).__name__
    if _is_st_class(loss, _LAYER_WRAPPERS):
        return (f"{name} evaluates its loss at the outputs of inner layers, through decorated forwards (and samples "
                "them at every call unless n_layers_per_step is -1)")
    if _is_st_class(loss, _TRUNCATING_WRAPPERS):
        dims, per_step = len(getattr(loss, "matryoshka_dims", ())), getattr(loss, "n_dims_per_step", -1)
        if 0 < per_step < dims:
            return (f"{name} samples {per_step} of its {dims} dimensions at every call (n_dims_per_step={per_step}), so "
                    "each micro-batch's clean and perturbed passes would see other dimensions; use n_dims_per_step=-1")
    return None


def is_sentence_transformers_trainer(trainer: Any) -> bool:
    return hasattr(trainer, "loss") and any(k.__module__.split(".")[0] == "sentence_transformers" for k in type(trainer).__mro__)


def losses_of(trainer: Any) -> list[nn.Module]:
    """The trainer's loss modules (one, or one per dataset of a multi-dataset run)."""
    loss = getattr(trainer, "loss", None)
    losses = list(loss.values()) if isinstance(loss, dict) else [loss]
    return [m for m in losses if isinstance(m, nn.Module)]


def _runs_own_backward(loss: nn.Module) -> bool:
    return any(
        getattr(m, "uses_gradient_cache", False) or any(k.__name__ == "CachedLossMixin" for k in type(m).__mro__)
        for m in loss.modules()
    )


def loss_kind(loss: nn.Module) -> str:
    """"own_backward", "mean", "whole_batch" or "unknown" (see the module's docstring)."""
    if _runs_own_backward(loss):
        return "own_backward"
    cls = type(loss)
    if cls.__module__.split(".")[0] != "sentence_transformers":
        return "unknown"
    if _is_st_class(loss, _TRUNCATING_WRAPPERS | _LAYER_WRAPPERS):
        inner = getattr(loss, "loss", None)
        if _wrapper_problem(loss) is not None or not isinstance(inner, nn.Module):
            return "unknown"
        return loss_kind(inner)  # a weighted sum over dimensions of the wrapped loss: a mean, or the whole batch's
    if cls.__name__ == "ContrastiveLoss" and not getattr(loss, "size_average", True):
        return "unknown"  # a sum over the batch: micro-batch losses would still add up, but their weights would not
    if cls.__name__ == "CosineSimilarityLoss" and getattr(getattr(loss, "loss_fct", None), "reduction", "mean") != "mean":
        return "unknown"
    if cls.__name__ in _MEANS:
        return "mean"
    if cls.__name__ in _WHOLE_BATCH and hasattr(loss, "compute_loss_from_embeddings"):
        return "whole_batch"
    return "unknown"


def _describe(loss: nn.Module) -> str:
    """The loss's class name, with the wrapped loss's: `MatryoshkaLoss(MultipleNegativesRankingLoss)`."""
    inner = getattr(loss, "loss", None)
    if _is_st_class(loss, _TRUNCATING_WRAPPERS | _LAYER_WRAPPERS) and isinstance(inner, nn.Module):
        return f"{type(loss).__name__}({_describe(inner)})"
    return type(loss).__name__


def _shrink(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """What MatryoshkaLoss does to a sentence embedding: the first `dim` features, L2-normalized (in float32 for
    half precisions)."""
    part = embedding[..., :dim]
    dtype = part.dtype
    if dtype in (torch.float16, torch.bfloat16):
        part = part.float()
    return nn.functional.normalize(part, p=2, dim=-1).to(dtype)


def loss_from_embeddings(loss: nn.Module) -> Any:
    """`loss.compute_loss_from_embeddings(embeddings, labels)` of a whole-batch loss, for a MatryoshkaLoss around one
    too: Σ_d w_d · L(embeddings truncated to d and normalized), labels that are embeddings truncated alike."""
    if not _is_st_class(loss, _TRUNCATING_WRAPPERS):
        return loss.compute_loss_from_embeddings
    inner = loss_from_embeddings(loss.loss)
    model = getattr(loss, "model", None)

    def compute(embeddings: list[torch.Tensor], labels: Any) -> torch.Tensor:
        total = 0.0
        width = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else embeddings[0].shape[-1]
        for dim, weight in zip(loss.matryoshka_dims, loss.matryoshka_weights):
            dim_labels = labels
            if isinstance(labels, torch.Tensor) and labels.ndim in (2, 3) and labels.shape[-1] == width:
                dim_labels = labels[..., :dim]
            value = inner([_shrink(e, dim) for e in embeddings], dim_labels)
            if isinstance(value, dict):
                value = torch.stack(list(value.values())).sum()
            total = total + weight * value
        return total

    return compute


def st_decomposable(trainer: Any, inputs: Any) -> bool | None:
    """Whether this batch's loss is the size-weighted sum of its micro-batches' losses (the vectorized step needs
    it), from what its loss is: True for a mean over examples (wrappers of one included), False for a loss over the
    whole batch, None when not known."""
    loss = trainer.loss
    if isinstance(loss, dict):
        loss = loss.get(inputs.get("dataset_name")) if isinstance(inputs, dict) else None
    if not isinstance(loss, nn.Module):
        return None
    return {"mean": True, "whole_batch": False}.get(loss_kind(loss))


def loss_parameters(trainer: Any, model: nn.Module) -> list[nn.Parameter] | None:
    """The parameters to perturb when a loss owns some (SoftmaxLoss's classifier): the model's, then the losses'
    own; None when no loss owns any (the engine then takes the model's)."""
    if not is_sentence_transformers_trainer(trainer):
        return None
    mine = {id(p) for p in model.parameters()}
    owned = []
    for loss in losses_of(trainer):
        for p in loss.parameters():
            if p.requires_grad and id(p) not in mine:
                mine.add(id(p))
                owned.append(p)
    return [*model.parameters(), *owned] if owned else None


def check_losses(trainer: Any, micro_batch_size: int | None) -> None:
    """Refuse, or say once, what mSAM does with the trainer's losses (run when the trainer is built, and again at the
    first step: under `hf-msam run` the sentence-transformers trainer sets its loss after the mixin's __init__)."""
    if getattr(trainer, "_msam_losses_checked", False) or not is_sentence_transformers_trainer(trainer):
        return
    trainer._msam_losses_checked = True
    kinds = {_describe(loss): loss_kind(loss) for loss in losses_of(trainer)}
    problems = [problem for loss in losses_of(trainer) if (problem := _wrapper_problem(loss))]
    cached = [name for name, kind in kinds.items() if kind == "own_backward"]
    if cached:
        raise ValueError(
            f"{', '.join(cached)} runs its own backward pass inside its forward (gradient caching), so mSAM can neither "
            "take its ascent gradient nor perturb it: every step would be unperturbed at twice the cost. Use the "
            "loss without caching (e.g. MultipleNegativesRankingLoss for CachedMultipleNegativesRankingLoss) with "
            "--msam_micro_batch_size: for losses over the whole batch hf-msam keeps the whole batch's loss and "
            "negatives and holds one micro-batch's activations at a time, as the cached loss does. Or set "
            "--msam_rho 0 to train without mSAM."
        )
    per_device = trainer.args.per_device_train_batch_size
    if micro_batch_size is None or micro_batch_size >= per_device:
        return  # one micro-batch per device: the loss is the batch's, whatever it is
    whole = [name for name, kind in kinds.items() if kind == "whole_batch"]
    unknown = [name for name, kind in kinds.items() if kind == "unknown"]
    if whole:
        logger.info(
            "mSAM: %s compare(s) the examples of a batch with each other: the loss, its logged value and the descent "
            "are the whole batch's (all in-batch negatives), with each micro-batch of %d embedded at its own "
            "perturbation (see docs/sentence-transformers.md).", ", ".join(whole), micro_batch_size,
        )
    if unknown:
        logger.warning(
            "mSAM: hf-msam cannot tell whether %s is a mean over examples: with --msam_micro_batch_size %d each "
            "micro-batch's loss is computed on its own, so a loss that compares the examples of a batch (in-batch "
            "negatives) sees only those of its micro-batch, and its value and gradient differ from the whole batch's. "
            "Use one of sentence-transformers' own losses, or --msam_micro_batch_size None (SAM on each device's "
            "whole batch).%s", ", ".join(unknown), micro_batch_size,
            "".join(f" ({problem}.)" for problem in problems),
        )


def whole_batch_loss(trainer: Any, inputs: dict[str, Any]) -> nn.Module | None:
    """The loss module of this batch when it is computed over the whole batch (see `loss_kind`), else None."""
    if not is_sentence_transformers_trainer(trainer):
        return None
    loss = trainer.loss
    if isinstance(loss, dict):
        loss = loss.get(inputs.get("dataset_name")) if isinstance(inputs, dict) else None
    return loss if isinstance(loss, nn.Module) and loss_kind(loss) == "whole_batch" else None


def whole_batch_step(trainer: Any, model: nn.Module, loss: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                     split_fn: Any, step: int, rho: Any) -> torch.Tensor:
    """One `training_step` of a loss over the whole batch: the loss normalized as `Trainer.training_step` does it."""
    from sentence_transformers.base.losses.merged_forward import embed_columns

    model.train()
    if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
        trainer.optimizer.train()
    inputs = {k: v for k, v in inputs.items() if k != "dataset_name"}
    _, labels = trainer.collect_features(inputs)
    encoder = next((m for m in (getattr(loss, "model", None), getattr(loss, "sentence_embedder", None)) if m is not None), model)
    if encoder is trainer.model and trainer.model_wrapped is not trainer.model:
        encoder = trainer.model_wrapped  # DDP: its no_sync and its all-reduce in the last backward
    scale = 1.0 if trainer._msam_loss_uses_num_items(num_items_in_batch) else 1.0 / trainer.current_gradient_accumulation_steps

    def forward_fn(micro_batch: dict[str, Any]) -> list[torch.Tensor]:
        features, _ = trainer.collect_features(micro_batch)
        return embed_columns(encoder, [dict(f) for f in features])  # copies: the modules write into the dicts

    compute = loss_from_embeddings(loss)

    def loss_fn(embeddings: list[torch.Tensor]) -> torch.Tensor:
        value = compute(embeddings, labels)
        if isinstance(value, dict):
            value = torch.stack(list(value.values())).sum()
        return value * scale

    return trainer._msam.backward_whole_batch(inputs, forward_fn, loss_fn, split_fn=split_fn, step=step, rho=rho)


class SentenceTransformersIntegration(TrainerIntegration):
    """sentence-transformers' trainer with `MSAMMixin` in front: its losses decide the step (see the module)."""

    name = "sentence-transformers"

    def applies(self, trainer: Any) -> bool:
        return is_sentence_transformers_trainer(trainer)

    def check(self, trainer: Any, micro_batch_size: int | None) -> None:
        check_losses(trainer, micro_batch_size)

    def extra_parameters(self, trainer: Any, model: nn.Module) -> list[nn.Parameter] | None:
        return loss_parameters(trainer, model)

    def decomposable(self, trainer: Any, inputs: Any) -> bool | None:
        return st_decomposable(trainer, inputs)

    def whole_batch_step(self, trainer, model, inputs, num_items_in_batch, split_fn, step, rho):
        loss = whole_batch_loss(trainer, inputs)
        if loss is None or not trainer.msam_micro_batch_size or batch_size_of(inputs) <= trainer.msam_micro_batch_size:
            return None
        return whole_batch_step(trainer, model, loss, inputs, num_items_in_batch, split_fn, step, rho)


register_integration(SentenceTransformersIntegration())
