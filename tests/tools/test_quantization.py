"""`hf_msam.flatness.quantization_sensitivity`: the loss and accuracy change when every nn.Linear and Conv1D weight
is rounded to b bits (symmetric, per output row), against a reference written here in plain PyTorch: a copy of the
model quantized row by row with Python loops, its loss and accuracy computed directly."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainer_reference import bert_data, stack, tiny_bert
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_msam.flatness import evaluate_flatness, quantization_sensitivity, quantize_rows


def reference_quantize(w: torch.Tensor, bits: int, rows_along: int) -> torch.Tensor:
    """Row by row (rows along dim `rows_along`): s = max|row| / (2^(b-1) - 1), q = clamp(round(row/s)) * s."""
    levels = 2 ** (bits - 1) - 1
    out = w.clone()
    for i in range(w.shape[rows_along]):
        row = w.select(rows_along, i)
        s = row.abs().max() / levels
        q = torch.zeros_like(row) if s == 0 else torch.clamp(torch.round(row / s), -levels, levels) * s
        out.select(rows_along, i).copy_(q)
    return out


def reference_delta(model, batches, bits, causal=False):
    def measure(m):
        m.eval()
        total, loss, right, counted = 0, 0.0, 0, 0
        with torch.no_grad():
            for b in batches:
                out = m(**b)
                n = b["labels"].shape[0]
                total += n
                loss += n * out.loss.item()
                logits, labels = out.logits, b["labels"]
                if causal:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                mask = labels != -100
                right += int((logits.argmax(-1).eq(labels) & mask).sum())
                counted += int(mask.sum())
        return loss / total, right / counted

    base = measure(copy.deepcopy(model))
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        done = set()
        for module in quantized.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) not in done:
                done.add(id(module.weight))
                module.weight.copy_(reference_quantize(module.weight, bits, 1 if isinstance(module, Conv1D) else 0))
    q = measure(quantized)
    return q[0] - base[0], q[1] - base[1]


def test_quantize_rows_matches_the_row_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w[2] = 0  # a zero row stays zero (no division by zero)
    for bits in (8, 4, 3, 2):
        torch.testing.assert_close(quantize_rows(w, bits), reference_quantize(w, bits, 0), rtol=0, atol=0)
        torch.testing.assert_close(quantize_rows(w, bits, dim=1), reference_quantize(w, bits, 1), rtol=0, atol=0)
    assert quantize_rows(w, 3).unique().numel() <= 1 + 5 * 6  # at most 2·3 nonzero levels per row, and 0
    with pytest.raises(ValueError, match="bits must be an integer >= 2"):
        quantize_rows(w, 1)


def test_classifier_deltas_equal_the_reference_and_the_model_is_restored():
    model = tiny_bert(seed=1)
    with torch.no_grad():  # wider weights, so that 3 bits visibly move the loss
        for p in model.parameters():
            p.mul_(8)
    model.train()
    before = copy.deepcopy(model.state_dict())
    batches = [stack(bert_data(8, seed=s)) for s in range(2)]
    got = quantization_sensitivity(model, batches, bits=(8, 4, 3))
    for bits in (8, 4, 3):
        loss, accuracy = reference_delta(model, batches, bits)
        assert got[bits]["loss"] == pytest.approx(loss, rel=1e-9, abs=1e-12)
        assert got[bits]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert abs(got[3]["loss"]) > abs(got[8]["loss"]) > 0  # fewer bits, a larger change
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bitwise
    assert all(m.training for m in model.modules())  # its mode back


def test_conv1d_is_quantized_per_output_column_and_the_tied_head_once():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    batches = [{"input_ids": ids, "labels": labels}]
    got = quantization_sensitivity(model, batches, bits=(4, 3))
    for bits in (4, 3):
        loss, accuracy = reference_delta(model, batches, bits, causal=True)
        assert got[bits]["loss"] == pytest.approx(loss, rel=1e-9, abs=1e-12)
        assert got[bits]["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_evaluate_flatness_reports_the_deltas(tmp_path):
    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    args = MSAMTrainingArguments(str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                                 msam_flatness_batches=2)  # fmt: skip
    data = bert_data(8)
    trainer = MSAMTrainer(model=tiny_bert(seed=2), args=args, eval_dataset=data)
    metrics = evaluate_flatness(trainer, quantization=True)
    assert set(metrics) == {f"eval_int{b}_{w}_delta" for b in (8, 4, 3) for w in ("loss", "accuracy")}
    direct = quantization_sensitivity(trainer.model, [stack(data[:4]), stack(data[4:])])
    assert metrics["eval_int3_loss_delta"] == pytest.approx(direct[3]["loss"], rel=1e-9, abs=1e-12)


def test_eval_quantization_flag_reaches_the_logs_compare_and_the_model_card(tmp_path):
    """--msam_eval_quantization: the deltas in the evaluation's metrics (equal to the function's on the same batches),
    in `hf-msam compare`'s table and in the model card's flatness section."""
    from hf_msam import MSAMTrainer, MSAMTrainingArguments
    from hf_msam.compare import load_run, write_report

    out = tmp_path / "run"
    args = MSAMTrainingArguments(str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                                 report_to="none", use_cpu=True, msam_micro_batch_size=2, msam_eval_quantization=True,
                                 msam_flatness_batches=2, eval_strategy="no", save_strategy="no")  # fmt: skip
    data = bert_data(8)
    trainer = MSAMTrainer(model=tiny_bert(seed=3), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    direct = quantization_sensitivity(trainer.model, [stack(data[:4]), stack(data[4:])])
    assert metrics["eval_int4_loss_delta"] == pytest.approx(direct[4]["loss"], rel=1e-9, abs=1e-12)
    trainer.save_state()
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert "## Flatness" in card and "loss change with the linear weights rounded to 3 bits" in card
    report = tmp_path / "report.md"
    write_report([load_run(out)], [], report, None)
    text = report.read_text()
    assert "Δloss int4" in text and "--msam_eval_quantization" in text
