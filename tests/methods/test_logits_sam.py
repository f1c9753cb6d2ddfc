"""logits-SAM (Luo et al., ICLR 2026, arXiv 2603.18258) against a reference written here in plain PyTorch.

The reference, for micro-batch j: the model runs with a forward hook on its output layer that returns
F.linear(h, W', b) for a head weight W' of the reference's choosing: g_j = ∂L_j/∂W' at W' = W (a detached leaf: the
head's use alone, whatever else reads W, e.g. a tied input embedding), e_j = ρ·g_j/(‖g_j‖ + ε) (adaptive: g_j ← |W| ⊙
g_j first), then W' = W + e_j (W the parameter: the gradient reaches it through the head) and c_j·L_j backward.
Nothing of hf_msam is used for it. The models are float64 and without dropout, so the engine's two passes and the
reference's see the same numbers.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments, build_method

RHO, EPS = 0.5, 1e-12
TIGHT = dict(rtol=1e-10, atol=1e-13)


def llama(tied=True, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config).double()
    model.train()
    return model


def bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForSequenceClassification(config).double()
    model.train()
    return model


def lm_batch(n=8, t=6, seed=1, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def cls_batch(n=8, t=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 30, (n, t), generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def loss_of(model):
    return lambda batch: model(**batch).loss


def head_of(model):
    return model.classifier if isinstance(model, BertForSequenceClassification) else model.lm_head


def split(batch, size):
    n = batch["labels"].shape[0]
    return [{k: v[s : s + size] for k, v in batch.items()} for s in range(0, n, size)]


def reference_grads(model, batch, size, rho=RHO, adaptive=False, scale=1.0):
    """Σ_j c_j ∇L_j(body at w, head at W + e_j), added to `.grad` (times `scale`)."""
    head = head_of(model)
    parts = split(batch, size or batch["labels"].shape[0])
    n = batch["labels"].shape[0]
    state = {}
    handle = head.register_forward_hook(lambda m, args, out: F.linear(args[0], state["w"], m.bias))
    try:
        for mb in parts:
            c = mb["labels"].shape[0] / n
            w = head.weight.detach().clone().requires_grad_(True)
            state["w"] = w
            (g,) = torch.autograd.grad(model(**mb).loss, w)
            if adaptive:
                g = g * head.weight.detach().abs()
            e = rho * g / (g.norm() + EPS)
            state["w"] = head.weight + e
            (model(**mb).loss * (c * scale)).backward()
    finally:
        handle.remove()


def engine_grads(model, batch, size, vectorize, adaptive=False, steps=1, **kwargs):
    perturbation, descent = build_method("logits_sam", rho=RHO, adaptive=adaptive, eps=EPS)
    sam = MicroBatchSAM(model, micro_batch_size=size, perturbation=perturbation, descent=descent, vectorize=vectorize,
                        **kwargs)
    sam.backward(batch, loss_of(model), step=0)
    return sam


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TIGHT, msg=name)


def compare(make, batch, size, vectorize, adaptive=False):
    model, ref = make(), make()
    sam = engine_grads(model, batch, size, vectorize, adaptive)
    reference_grads(ref, batch, size, adaptive=adaptive)
    assert_same(grads(model), grads(ref))
    return sam


@pytest.mark.parametrize("vectorize", ["off", "on"])
@pytest.mark.parametrize("size", [8, 2], ids=["k1", "k4"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_equals_the_reference(tied, size, vectorize):
    if size == 8 and vectorize == "on":
        vectorize = "auto"  # one micro-batch: nothing to vectorize ("on" refuses it)
    sam = compare(lambda: llama(tied), lm_batch(), size, vectorize)
    assert sam.path == ("vectorized" if size == 2 and vectorize == "on" else "sequential")
    assert "lm_head" in sam.path_line
    # Not SAM on every weight, not the plain gradient: the head's perturbation moved the body's gradient too.
    plain = llama(tied)
    plain.model.zero_grad()
    for mb in split(lm_batch(), size):
        (loss_of(plain)(mb) * (mb["labels"].shape[0] / 8)).backward()
    layer = "model.layers.0.mlp.up_proj.weight"
    model = llama(tied)
    engine_grads(model, lm_batch(), size, vectorize)
    assert (grads(model)[layer] - grads(plain)[layer]).abs().max() > 1e-6


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_adaptive_scales_by_the_weight(vectorize):
    compare(lambda: llama(True), lm_batch(), 2, vectorize, adaptive=True)


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_bert_classifier_is_the_last_linear(vectorize, caplog):
    with caplog.at_level(logging.INFO, logger="hf_msam"):
        sam = compare(bert, cls_batch(), 2, vectorize)
    assert "output layer classifier " in sam.path_line and "classifier" in caplog.text


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_body_forward_runs_once_per_group(vectorize):
    model = llama(True)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    head_calls = []
    model.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1))
    engine_grads(model, lm_batch(), 2, vectorize)
    assert len(calls) == (4 if vectorize == "off" else 1)  # k micro-batches, one body forward each, or one for all
    assert len(head_calls) == 2 * len(calls)  # the head twice: at W, and at W + e_j


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_frozen_head_under_lora_is_perturbed_not_updated(vectorize):
    peft = pytest.importorskip("peft")

    def make():
        model = peft.get_peft_model(llama(False), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))  # fmt: skip
        model.train()
        return model

    model, ref, plain = make(), make(), make()
    engine_grads(model, lm_batch(), 2, vectorize)
    assert model.base_model.model.lm_head.weight.grad is None
    # the reference's hook on the base model's head (PEFT leaves lm_head a plain Linear)
    ref.lm_head = ref.base_model.model.lm_head
    reference_grads(ref, lm_batch(), 2)
    assert_same(grads(model), grads(ref))
    for mb in split(lm_batch(), 2):
        (plain(**mb).loss * 0.25).backward()
    assert max((grads(model)[n] - g).abs().max().item() for n, g in grads(plain).items()) > 1e-6  # e ≠ 0 mattered


def test_gradient_accumulation_adds_each_call():
    for vectorize in ("off", "on"):
        model, ref = llama(True), llama(True)
        perturbation, descent = build_method("logits_sam", rho=RHO, eps=EPS)
        sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=perturbation, descent=descent, vectorize=vectorize)
        for seed in (1, 5):
            sam.backward(lm_batch(seed=seed), loss_of(model), step=7)
            reference_grads(ref, lm_batch(seed=seed), 2)
        assert_same(grads(model), grads(ref))
        assert sam.stats.micro_batches == 8 and sam.stats.steps == 1


def test_trainer_step_with_accumulation_equals_the_reference(tmp_path):
    """MSAMTrainer, SGD, 2 accumulation steps of 8 rows, micro-batches of 2: the parameters after one step."""
    from datasets import Dataset

    data = [{"input_ids": r, "labels": r} for r in lm_batch(16, seed=3)["input_ids"].tolist()]
    lr = 0.5
    for vectorize in ("off", "on"):
        model, ref = llama(True), llama(True)
        args = MSAMTrainingArguments(str(tmp_path / vectorize), max_steps=1, per_device_train_batch_size=8,
                                     gradient_accumulation_steps=2, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
                                     weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
                                     dataloader_drop_last=True, msam_method="logits_sam", msam_rho=RHO, msam_eps=EPS,
                                     msam_micro_batch_size=2, msam_vectorize=vectorize, logging_steps=1)  # fmt: skip
        trainer = MSAMTrainer(model=model, args=args, train_dataset=Dataset.from_list(data))
        order = [batch for batch in trainer.get_train_dataloader()]  # the rows the trainer draws, in its order
        trainer.train()
        assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
        ref.zero_grad()
        for batch in order:
            # Llama's loss under the Trainer: the token sum over the step's tokens (num_items_in_batch), so each
            # accumulation call's loss is its token mean times its share of the step's tokens (here 1/2)
            reference_grads(ref, {k: v for k, v in batch.items()}, 2, scale=0.5)
        with torch.no_grad():
            expected = {n: p - lr * p.grad for n, p in ref.named_parameters()}
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], **TIGHT, msg=n)


def test_precondition_is_refused():
    with pytest.raises(ValueError, match="msam_precondition adam does not combine with --msam_method logits_sam"):
        MSAMTrainingArguments("out", msam_method="logits_sam", msam_precondition="adam", report_to=[])
    with pytest.raises(ValueError, match="logits_sam"):
        build_method("logits_sam", msam_precondition="adam")


def test_a_model_without_an_output_layer_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="output layer"):
        MicroBatchSAM(model, perturbation=build_method("logits_sam")[0])


def test_copy_of_the_rule_state_is_empty():
    rule = build_method("logits_sam", rho=0.2, adaptive=True)[0]
    assert rule.enabled and rule.adaptive and rule.state_dict() == {} and "adaptive=True" in repr(copy.copy(rule))


# -- TRL's SFT and DPO with their defaults (the fused LM head, hf_msam/integrations/trl_fused_head.py) ----------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("trl")
    from trl_helpers import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def counted(model):
    """The model, with the number of its body's forwards (a layer's pre-hook) in `model.body_calls`."""
    model.body_calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: model.body_calls.append(torch.is_grad_enabled()))
    return model


def trl_run(llama_dir, tmp_path, kind, vectorize, rho=0.1):
    from datasets import Dataset
    from test_trl import COMMON, dpo_common, load
    from test_vectorized_arch import without_float32_casts  # noqa: F401  (the caller patches)
    from transformers import AutoTokenizer
    from trl_helpers import PREFERENCES, PROMPT_COMPLETION

    from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer, MSAMSFTConfig, MSAMSFTTrainer

    model = counted(load(llama_dir))
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    settings = dict(msam_method="logits_sam", msam_rho=rho, msam_vectorize=vectorize)
    if kind == "sft":
        args = MSAMSFTConfig(str(tmp_path / f"sft-{vectorize}-{rho}"), **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 5,
                             "msam_micro_batch_size": 2, **settings})  # fmt: skip
        trainer = MSAMSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:10]),
                                 processing_class=tokenizer)  # fmt: skip
    else:
        args = MSAMDPOConfig(**dpo_common(tmp_path / f"dpo-{vectorize}-{rho}", max_steps=2, per_device_train_batch_size=3),
                             msam_micro_batch_size=1, **settings)  # fmt: skip
        trainer = MSAMDPOTrainer(model=model, ref_model=load(llama_dir), args=args,
                                 train_dataset=Dataset.from_list(PREFERENCES), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_fused_head_vectorized_equals_sequential(llama_dir, tmp_path, monkeypatch, kind):
    """TRL's defaults (fused LM head): the vectorized form equals one micro-batch at a time at test_trl_fused_head.py's
    tolerances, the body runs once per step on it (k per step on the other), and the perturbation moved the update."""
    from test_trl import load, trainable
    from test_trl_fused_head import TIGHT as FUSED
    from test_vectorized_arch import without_float32_casts

    import trl.trainer.utils as trl_utils

    without_float32_casts(monkeypatch)
    # TRL's backward is asked for the hidden states' gradient only where the pass uses it: not in the first pass's
    # autograd.grad to the head's weight alone (that would be one more [tokens, vocab] x [vocab, H] product).
    fused, hidden_wanted = trl_utils._ChunkedLogProbFunction, []

    def backward(ctx, *grads):
        hidden_wanted.append(ctx.needs_input_grad[0])
        return original_backward(ctx, *grads)

    original_backward = fused.backward
    monkeypatch.setattr(fused, "backward", staticmethod(backward))
    on, off = trl_run(llama_dir, tmp_path, kind, "on"), trl_run(llama_dir, tmp_path, kind, "off")
    # once per group of each pass: the first pass's backward without it, the perturbed pass's with it; 5 groups a run
    assert hidden_wanted.count(False) == hidden_wanted.count(True) == 10, hidden_wanted
    assert on.msam_engine.path == "vectorized" and off.msam_engine.path == "sequential"
    assert "lm_head" in on.msam_engine.path_line
    for name, a in trainable(on.model).items():
        torch.testing.assert_close(a, trainable(off.model)[name], **FUSED, msg=name)
    # micro-batches over the two steps: SFT 5 rows by 2, then the last 3 rows (3 + 2); DPO 3 pairs by 1, then 2 (3 + 2)
    assert on.model.body_calls.count(True) == 2 and off.model.body_calls.count(True) == 5
    plain = trainable(trl_run(llama_dir, tmp_path, kind, "off", rho=0.0).model)
    start = trainable(load(llama_dir))
    assert max((plain[n] - start[n]).abs().max().item() for n in plain) > 1e-3
    assert max((plain[n] - a).abs().max().item() for n, a in trainable(off.model).items()) > 100 * FUSED["atol"]


# -- DDP ---------------------------------------------------------------------------------------------------------------


def union_reference_grads(models, batches, size, rho=RHO):
    """Synchronized scope: g_j the mean over the devices of their j-th micro-batch's head gradients (equal sizes), each
    device's descent at W + e_j; `.grad` of each model gets its own device's Σ_j c_j ∇L_j."""
    heads = [m.lm_head for m in models]
    state = [{} for _ in models]
    handles = [h.register_forward_hook(lambda m, a, o, s=s: F.linear(a[0], s["w"], m.bias)) for h, s in zip(heads, state)]
    try:
        parts = [split(b, size) for b in batches]
        for j in range(len(parts[0])):
            gs = []
            for model, head, s, p in zip(models, heads, state, parts):
                s["w"] = head.weight.detach().clone().requires_grad_(True)
                gs.append(torch.autograd.grad(model(**p[j]).loss, s["w"])[0])
            g = sum(gs) / len(gs)
            e = rho * g / (g.norm() + EPS)
            for model, head, s, p, b in zip(models, heads, state, parts, batches):
                s["w"] = head.weight + e
                (model(**p[j]).loss * (p[j]["labels"].shape[0] / b["labels"].shape[0])).backward()
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_equals_the_per_device_reference(tmp_path):
    """2 gloo processes, 2 SGD steps: device-local (sequential and vectorized) and synchronized perturbations; DDP
    averages the devices' descents once per step (the token counts are equal on both)."""
    from conftest import torchrun_ranks

    ranks = torchrun_ranks(tmp_path, "ddp_logits_sam_script.py", timeout=600)
    assert ranks[0]["world_size"] == 2
    on, sync = ranks[0]["runs"]["on"]["final"], ranks[0]["runs"]["sync"]["final"]
    assert max((on[n] - sync[n]).abs().max().item() for n in on) > 1e-6  # the scopes differ
    for name in ("off", "on", "sync"):
        runs = [r["runs"][name] for r in ranks]
        assert runs[0]["path"] == ("sequential" if name == "off" else "vectorized")
        assert not torch.equal(runs[0]["batches"][0]["input_ids"], runs[1]["batches"][0]["input_ids"])
        for n, a in runs[0]["final"].items():
            assert torch.equal(a, runs[1]["final"][n]), n  # all-reduced once per step: the ranks end in sync
        model = llama(True)
        model.load_state_dict(ranks[0]["initial"], strict=False)  # tied: lm_head.weight is embed_tokens.weight
        for step in range(2):
            copies = [copy.deepcopy(model) for _ in ranks]
            batches = [run["batches"][step] for run in runs]
            if name == "sync":
                union_reference_grads(copies, batches, 2)
            else:
                for c, b in zip(copies, batches):
                    reference_grads(c, b, 2)
            with torch.no_grad():
                for (n, p), a, b in zip(model.named_parameters(), copies[0].parameters(), copies[1].parameters()):
                    p -= 0.5 * (a.grad + b.grad) / 2
        for n, p in model.named_parameters():
            torch.testing.assert_close(runs[0]["final"][n], p.detach(), **TIGHT, msg=f"{name}: {n}")
