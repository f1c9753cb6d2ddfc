"""Shared pieces of the TRL tests: a tiny Llama with a word-level tokenizer, data, and a plain-PyTorch mSAM reference
(no hf_msam code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

WORDS = (
    "<pad> <eos> <unk> what is the a cat dog bird sat ran flew on under mat log tree red blue green big small "
    "yes no it and who where"
).split()

PROMPT_COMPLETION = [
    {"prompt": "what is the cat", "completion": " the cat sat on a mat"},
    {"prompt": "what is it", "completion": " a big red dog"},
    {"prompt": "is it a log", "completion": " no"},
    {"prompt": "the dog ran", "completion": " yes it ran under the big tree and on the log"},
    {"prompt": "red", "completion": " blue"},
    {"prompt": "where is the bird", "completion": " on the green tree"},
    {"prompt": "who sat", "completion": " the small cat sat"},
    {"prompt": "is it blue", "completion": " yes it is"},
]

PREFERENCES = [
    {"prompt": "what is the cat", "chosen": " the cat sat on a mat", "rejected": " blue"},
    {"prompt": "is it a log", "chosen": " no", "rejected": " yes it is a big red log"},
    {"prompt": "where is the bird", "chosen": " on the green tree", "rejected": " under the mat"},
    {"prompt": "who ran", "chosen": " the dog ran", "rejected": " no"},
    {"prompt": "is it red", "chosen": " yes it is red", "rejected": " it is green and blue"},
]


def write_tiny_llama(path: Path) -> Path:
    """A 2-layer Llama (random weights) and a word-level tokenizer (eos, pad), saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", model_max_length=64
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_jsonl(directory: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ---------------------------------------------------------------------------------------------


def token_nll_sum(model, input_ids, labels, attention_mask=None) -> tuple[torch.Tensor, int]:
    """Σ over label tokens of −log p(label_t | tokens < t) (labels shifted by one, −100 ignored), and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return total, int(targets.ne(-100).sum())


def completion_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """log p(completion | prompt) of each row: Σ_t completion_mask[t] · log p(token_t | tokens < t)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


def msam_gradient(model, loss_fns, weights, rho, eps=1e-12) -> list[torch.Tensor]:
    """Σ_j c_j ∇L_j(w + e_j), e_j = ρ g_j/(‖g_j‖ + eps), g_j = ∇L_j(w), over the trainable parameters; the model is
    left as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for loss_fn, c in zip(loss_fns, weights):
        g = torch.autograd.grad(loss_fn(), params, allow_unused=True, materialize_grads=True)
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        with torch.no_grad():
            for p, w, gi in zip(params, w0, g):
                p.copy_(w + rho * gi / (norm + eps))
        g_perturbed = torch.autograd.grad(loss_fn(), params, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for t, gi in zip(total, g_perturbed):
                t.add_(c * gi)
            for p, w in zip(params, w0):
                p.copy_(w)
    return total


def sgd_reference(model, gradient, lr) -> dict[str, torch.Tensor]:
    """The trainable weights after one plain SGD step w − lr·g."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    return {n: (p.detach() - lr * g) for n, p, g in zip(names, params, gradient)}


def sft_reference_step(model, batch, micro_batch_size, rho, lr, by_rows=False):
    """mSAM-SFT on a padded batch: micro-batches of rows, each loss the mean over its label tokens, weighted by its
    share of the batch's label tokens (`by_rows`: by its share of the rows, for contrast)."""
    n = batch["input_ids"].shape[0]
    rows = [range(a, min(a + micro_batch_size, n)) for a in range(0, n, micro_batch_size)]
    counts = [len(r) if by_rows else int(batch["labels"][list(r), 1:].ne(-100).sum()) for r in rows]

    def loss_of(r):
        def loss():
            idx = list(r)
            total, count = token_nll_sum(model, batch["input_ids"][idx], batch["labels"][idx], batch["attention_mask"][idx])
            return total / count

        return loss

    weights = [c / sum(counts) for c in counts]
    return sgd_reference(model, msam_gradient(model, [loss_of(r) for r in rows], weights, rho), lr)
