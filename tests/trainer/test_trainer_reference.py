"""One SGD step of MSAMTrainer equals w − lr·(reference mSAM gradient), the reference in plain PyTorch."""

import copy

import pytest
import torch
from reference import MLP, flat, mlp_dataset, msam_gradient
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_msam import MSAMTrainer, MSAMTrainingArguments

LR = 0.5
# float64 models: the reference and the trainer differ only by summation order, far below these.
TIGHT = dict(rtol=1e-9, atol=1e-12)


def tiny_bert(seed=0, num_labels=2):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).double()


def bert_data(n, seq_len=7, seed=1, num_labels=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def stack(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def sgd_args(tmp_path, batch_size, **kwargs):
    return MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, max_steps=1, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no",
        logging_strategy="no", **kwargs,
    )


def expected_after_step(model, grads):
    params = [p for p in model.parameters() if p.requires_grad]
    return [(p - LR * g).detach() for p, g in zip(params, grads)]


def trainable(model):
    return [p.detach() for p in model.parameters() if p.requires_grad]


def assert_step_matches(model, data, tmp_path, micro_batch_size, rho=0.05, adaptive=False, **kwargs):
    reference_model = copy.deepcopy(model)
    grads = msam_gradient(reference_model, stack(data), micro_batch_size, rho, adaptive=adaptive)
    expected = expected_after_step(reference_model, grads)
    args = sgd_args(tmp_path, len(data), msam_rho=rho, msam_micro_batch_size=micro_batch_size, msam_adaptive=adaptive, **kwargs)
    MSAMTrainer(model=model, args=args, train_dataset=data).train()
    got = trainable(model)
    # The step moved the weights, and by exactly the reference mSAM step.
    assert any(not torch.equal(a, b) for a, b in zip(got, trainable(reference_model)))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("micro_batch_size", [None, 1, 2, 4])
def test_bert_sam_and_msam_match_reference(tmp_path, micro_batch_size):
    assert_step_matches(tiny_bert(), bert_data(8), tmp_path, micro_batch_size)


def test_uneven_last_micro_batch_is_weighted_by_size(tmp_path):
    assert_step_matches(tiny_bert(), bert_data(10), tmp_path, micro_batch_size=4)  # 4 + 4 + 2


def test_asam_matches_reference(tmp_path):
    assert_step_matches(tiny_bert(), bert_data(8), tmp_path, micro_batch_size=4, rho=0.5, adaptive=True)


def test_msam_differs_from_sam(tmp_path):
    """Guards the reference tests themselves: micro-batching must change the step."""
    data = bert_data(8)
    sam, msam = tiny_bert(), tiny_bert()
    MSAMTrainer(model=sam, args=sgd_args(tmp_path, 8, msam_rho=0.5), train_dataset=data).train()
    MSAMTrainer(model=msam, args=sgd_args(tmp_path, 8, msam_rho=0.5, msam_micro_batch_size=2), train_dataset=data).train()
    assert not torch.allclose(flat_params(sam), flat_params(msam), rtol=1e-6, atol=0)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_gradient_accumulation_perturbs_each_accumulation_step(tmp_path):
    """GA=2 on a model whose loss is a plain mean: the step is the mean of the two batches' mSAM gradients."""
    torch.manual_seed(0)
    model = MLP().double()
    data = mlp_dataset(12)
    ref = copy.deepcopy(model)
    g1 = msam_gradient(ref, stack(data[:6]), 4, 0.1)
    g2 = msam_gradient(ref, stack(data[6:]), 4, 0.1)
    expected = expected_after_step(ref, [(a + b) / 2 for a, b in zip(g1, g2)])
    args = sgd_args(tmp_path, 6, gradient_accumulation_steps=2, msam_rho=0.1, msam_micro_batch_size=4)
    MSAMTrainer(model=model, args=args, train_dataset=data).train()
    for a, b in zip(trainable(model), expected):
        torch.testing.assert_close(a, b, **TIGHT)


def test_token_level_loss_with_gradient_accumulation_uses_num_items_in_batch(tmp_path):
    """A causal LM normalizes by `num_items_in_batch` (label tokens over all accumulation steps): micro-batch j
    carries Σ_{tokens in B_j} ∇ℓ(w + e_j) / N, where e_j comes from the token-mean loss of B_j."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (8, 6), generator=g)
    labels = ids.clone()
    for i, keep in enumerate([6, 3, 5, 2, 6, 4, 1, 6]):  # ragged: the token counts differ per row
        labels[i, keep:] = -100
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]

    def token_sum(m, mb):  # in float32, as the model's own loss computes it (it upcasts logits to float32)
        logits = m(input_ids=mb["input_ids"]).logits[:, :-1].float()
        target = mb["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 30), target.reshape(-1), ignore_index=-100, reduction="sum")

    ref = copy.deepcopy(model)
    counts = lambda mb: float((mb["labels"][:, 1:] != -100).sum())  # noqa: E731
    N = counts({"labels": labels})
    total = None
    for half in (data[:4], data[4:]):  # the two accumulation steps, micro-batches of 2 rows
        batch = stack(half)
        # gradient of the token-mean loss per micro-batch, weighted by its share of ALL tokens of the step
        grads = msam_gradient(
            ref, batch, 2, 0.05, loss_of=lambda m, mb: token_sum(m, mb) / counts(mb), weights=lambda micro: [counts(mb) / N for mb in micro]
        )
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    expected = expected_after_step(ref, total)
    args = sgd_args(tmp_path, 4, gradient_accumulation_steps=2, msam_micro_batch_size=2)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    # The model's loss runs in float32 (it upcasts the logits): float32-level agreement. Weighting the
    # micro-batches by rows instead of tokens would be off by ~4e-3 here; the update itself is ~7e-2.
    for a, b in zip(trainable(model), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_lora_only_adapter_is_perturbed_and_trained(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_bert()
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], init_lora_weights=False)
    model = get_peft_model(model, lora).double()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and any(p.requires_grad for p in model.parameters())
    assert_step_matches(model, bert_data(8), tmp_path, micro_batch_size=2)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_batchnorm_running_stats_updated_once_per_micro_batch_by_clean_pass(tmp_path):
    torch.manual_seed(0)
    model = MLP(batch_norm=True).double()
    data = mlp_dataset(9)
    # Reference running statistics: one clean training-mode forward per micro-batch (4, 4, 1 is not allowed
    # by BatchNorm in training mode for a single row, so 9 rows in micro-batches of 3).
    stats_ref = copy.deepcopy(model).train()
    batch = stack(data)
    with torch.no_grad():
        for s in range(0, 9, 3):
            stats_ref(x=batch["x"][s : s + 3])
    assert_step_matches(model, data, tmp_path, micro_batch_size=3)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(stats_ref.bn, name)), name


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_bf16_autocast_matches_reference_under_autocast(tmp_path, vectorize):
    torch.manual_seed(0)
    model = MLP(d_in=16, d_hidden=32)  # float32 weights, bf16 autocast compute
    data = mlp_dataset(8, d_in=16, dtype=torch.float32)
    ref, start = copy.deepcopy(model), copy.deepcopy(model)

    def loss_of(m, mb):  # each forward in its own autocast region, as accelerate runs them
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**mb)["loss"]

    grads = msam_gradient(ref, stack(data), 4, 0.05, loss_of=loss_of)
    expected = expected_after_step(ref, grads)
    args = sgd_args(tmp_path, 8, bf16=True, msam_micro_batch_size=4, msam_vectorize=vectorize)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
    if vectorize == "off":
        for a, b in zip(trainable(model), expected):
            # same bf16 kernels in the same order; allow for float32 rounding in the update only
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        # other bf16 kernels (one batched matmul for both micro-batches): the update agrees with the float64
        # reference to bf16 precision (unit roundoff 2^-8 = 3.9e-3; the sequential path is 3.7e-3 off here, this 3.8e-3)
        exact = copy.deepcopy(start).double()
        batch64 = {k: v.double() if v.is_floating_point() else v for k, v in stack(data).items()}
        update64 = flat(expected_after_step(exact, msam_gradient(exact, batch64, 4, 0.05))) - flat(trainable(exact))
        update = flat(trainable(model)).double() - flat(trainable(start)).double()
        assert (update - update64).norm() / update64.norm() < 1e-2
    assert any(not torch.equal(a, b) for a, b in zip(trainable(model), trainable(ref)))


def test_rho_zero_is_bitwise_the_plain_trainer(tmp_path):
    data = bert_data(16)
    common = dict(
        per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, report_to="none", use_cpu=True,
        save_strategy="no", logging_strategy="no", seed=7,
    )
    plain, msam = tiny_bert(), tiny_bert()
    Trainer(model=plain, args=TrainingArguments(str(tmp_path / "a"), **common), train_dataset=data).train()
    MSAMTrainer(
        model=msam, args=MSAMTrainingArguments(str(tmp_path / "b"), msam_rho=0.0, msam_micro_batch_size=2, **common), train_dataset=data
    ).train()
    for (n, a), b in zip(plain.named_parameters(), msam.parameters()):
        assert torch.equal(a, b), n


def test_zero_learning_rate_leaves_weights_bitwise_unchanged(tmp_path):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    args = MSAMTrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.0, msam_rho=0.5,
        msam_micro_batch_size=2, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
    )
    MSAMTrainer(model=model, args=args, train_dataset=bert_data(12)).train()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_exception_in_perturbed_pass_leaves_weights_intact(tmp_path):
    class FailingSecondPass(MSAMTrainer):
        calls = 0

        def compute_loss(self, *args, **kwargs):
            FailingSecondPass.calls += 1
            if FailingSecondPass.calls == 2:  # the forward at w + e
                raise RuntimeError("boom")
            return super().compute_loss(*args, **kwargs)

    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = FailingSecondPass(model=model, args=sgd_args(tmp_path, 8, msam_rho=1.0), train_dataset=bert_data(8))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert FailingSecondPass.calls == 2
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_logged_loss_is_clean_and_msam_metrics_are_logged(tmp_path):
    data = bert_data(8)
    model = tiny_bert()
    ref = copy.deepcopy(model)
    batch = stack(data)
    with torch.no_grad():
        clean = ref(**batch).loss.item()
    args = sgd_args(tmp_path, 8, msam_rho=0.5, msam_micro_batch_size=4)
    args.logging_strategy, args.logging_steps = "steps", 1
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(clean, rel=1e-6)  # the Trainer logs in float32
    # the perturbed loss: mean over the two micro-batches of L_j(w + e_j), computed by hand
    perturbed = 0.0
    params = list(ref.parameters())
    for s in (0, 4):
        mb = {k: v[s : s + 4] for k, v in batch.items()}
        g = torch.autograd.grad(ref(**mb).loss, params)
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, x in zip(params, g):
                p.add_(0.5 * x / (norm + 1e-12))
            perturbed += ref(**mb).loss.item() / 2
            for p, w in zip(params, saved):
                p.copy_(w)
    assert log["msam/perturbed_loss"] == pytest.approx(perturbed, rel=1e-5)  # logged in float32
    assert log["msam/sharpness"] == pytest.approx(perturbed - clean, rel=1e-3)
    assert log["msam/sharpness"] > 0
    assert log["msam/ascent_grad_norm"] > 0
    assert log["msam/skipped_perturbations"] == 0
    assert trainer.msam_perturbations_per_step == 2 and log["msam/micro_batches_per_step"] == 2


def test_micro_batch_without_label_tokens_adds_nothing_and_logs_finite_numbers(tmp_path):
    """Completion-only losses can leave a micro-batch with no label token (a truncated completion): its loss is
    0 (not 0/0), it adds nothing, and the step equals the reference over the other micro-batches."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    for i, keep in enumerate([6, 1, 4, 3]):  # row 1 keeps only its first label, which the shift drops: 0 tokens
        labels[i, keep:] = -100
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)]

    def token_sum(m, mb):
        logits = m(input_ids=mb["input_ids"]).logits[:, :-1].float()
        target = mb["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 30), target.reshape(-1), ignore_index=-100, reduction="sum")

    counts = lambda mb: float((mb["labels"][:, 1:] != -100).sum())  # noqa: E731
    N = counts({"labels": labels})
    ref = copy.deepcopy(model)
    with_tokens = stack([d for i, d in enumerate(data) if i != 1])
    grads = msam_gradient(
        ref, with_tokens, 1, 0.05, loss_of=lambda m, mb: token_sum(m, mb) / counts(mb), weights=lambda micro: [counts(mb) / N for mb in micro]
    )
    expected = expected_after_step(ref, grads)
    args = sgd_args(tmp_path, 4, msam_micro_batch_size=1)
    args.logging_strategy, args.logging_steps = "steps", 1
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for a, b in zip(trainable(model), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    logged = next(entry for entry in trainer.state.log_history if "msam/sharpness" in entry)
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in ("loss", "msam/perturbed_loss", "msam/sharpness"))
    assert logged["loss"] > 0 and logged["msam/skipped_perturbations"] == 1  # the empty micro-batch has no direction


def test_accumulation_batch_without_label_tokens_adds_nothing_and_logs_the_plain_loss(tmp_path):
    """Gradient accumulation with completion-only labels: a whole accumulation batch without a label token (its
    micro-batches' shares are 0/0) and a micro-batch without one contribute nothing, nothing is NaN, the logged loss
    is the plain Trainer's, and the step equals the token-weighted reference over the micro-batches with tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).double()
    assert sum(p.numel() for p in model.parameters()) < 1000
    ids = torch.randint(0, 16, (12, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    # accumulation batches of 4 rows, micro-batches of 2; keeping 0 or 1 label leaves no token after the shift
    for i, keep in enumerate([6, 1, 4, 3, 0, 1, 0, 0, 5, 2, 1, 0]):
        labels[i, keep:] = -100
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(12)]

    def token_sum(m, mb):
        logits = m(input_ids=mb["input_ids"]).logits[:, :-1].float()  # as transformers computes the loss
        target = mb["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 16), target.reshape(-1), ignore_index=-100, reduction="sum")

    counts = lambda mb: float((mb["labels"][:, 1:] != -100).sum())  # noqa: E731
    N = counts({"labels": labels})
    ref = copy.deepcopy(model)
    loss_of = lambda m, mb: token_sum(m, mb) / counts(mb)  # noqa: E731
    token_weights = lambda micro: [counts(mb) / N for mb in micro]  # noqa: E731
    first = msam_gradient(ref, stack(data[0:4]), 2, 0.05, loss_of=loss_of, weights=token_weights)
    third = msam_gradient(ref, stack(data[8:10]), None, 0.05, loss_of=loss_of, weights=token_weights)  # rows 10-11: none
    expected = expected_after_step(ref, [a + b for a, b in zip(first, third)])

    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=1, optim="sgd", learning_rate=LR,
                  lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
                  report_to="none", use_cpu=True, save_strategy="no", logging_strategy="steps", logging_steps=1,
                  disable_tqdm=True)  # fmt: skip
    plain = Trainer(model=copy.deepcopy(model), args=TrainingArguments(str(tmp_path / "plain"), **common), train_dataset=data)
    plain.train()
    trainer = MSAMTrainer(model=model, args=MSAMTrainingArguments(str(tmp_path / "msam"), msam_rho=0.05,
                          msam_micro_batch_size=2, **common), train_dataset=data)  # fmt: skip
    trainer.train()
    for a, b in zip(trainable(model), expected):  # the model's loss is float32 (transformers casts the logits)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    logged, plain_logged = trainer.state.log_history[0], plain.state.log_history[0]
    assert logged["loss"] == pytest.approx(plain_logged["loss"], rel=1e-9)
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in ("msam/perturbed_loss", "msam/sharpness", "msam/ascent_grad_norm"))
    assert logged["msam/skipped_perturbations"] == 3 and logged["msam/micro_batches_per_step"] == 6  # 3 without a token


def test_micro_batch_larger_than_the_batch_warns_once_and_reports_the_real_size(tmp_path, caplog):
    """--msam_micro_batch_size 16 with per-device batches of 8: one warning, the start-up line and the model card say
    micro-batches of 8 (not 16), and each step is SAM on the whole batch of 8 (the reference with one micro-batch)."""
    import logging

    model, data = tiny_bert(), bert_data(16)
    reference = copy.deepcopy(model)
    args = sgd_args(tmp_path, 8, msam_rho=0.05, msam_micro_batch_size=16)
    args.max_steps = 2
    with caplog.at_level(logging.INFO, logger="hf_msam"):
        trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "--msam_micro_batch_size 16 is larger than the per-device batch (8): each device's batch is one micro-batch "
        "of 8 example(s), which is SAM on each device."
    ]
    assert trainer.msam_micro_batches_per_device == 1 and trainer.msam_perturbations_per_step == 1
    assert "1 micro-batch(es) of 8 example(s) per device" in caplog.text and "of 16 example(s)" not in caplog.text
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "- micro-batch size: 8 example(s) per perturbation, per device (the whole per-device batch" in card

    for step in range(2):
        grads = msam_gradient(reference, stack(data[8 * step : 8 * step + 8]), None, 0.05)
        with torch.no_grad():
            for p, g in zip([p for p in reference.parameters() if p.requires_grad], grads):
                p.sub_(LR * g)
    for a, b in zip(trainable(model), trainable(reference)):
        torch.testing.assert_close(a, b, **TIGHT)


def test_model_card_names_a_local_base_model(tmp_path, request):
    """transformers' card calls a model loaded from a local directory "trained from scratch": it names the directory."""
    tiny_bert_dir = request.getfixturevalue("tiny_bert")  # conftest's: a BERT saved to a directory
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    trainer = MSAMTrainer(model=model, args=sgd_args(tmp_path, 8, msam_rho=0.05), train_dataset=bert_data(8))
    trainer.create_model_card(model_name="tiny")
    text = (tmp_path / "README.md").read_text()
    assert "trained from scratch" not in text
    assert f"This model is a fine-tuned version of the local model `{tiny_bert_dir.name}` on " in text
