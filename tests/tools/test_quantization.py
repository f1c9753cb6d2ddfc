"""`hf_msam.flatness.quantization_sensitivity`: the loss and accuracy change when every nn.Linear and Conv1D weight
is rounded to b bits (symmetric, per output row), against a reference written here in plain PyTorch: a copy of the
model quantized row by row with Python loops, its loss and accuracy computed directly."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from test_trainer_reference import bert_data, stack, tiny_bert
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from hf_msam.compare import Run, load_run, write_report
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


def reference_delta(model, batches, bits, causal=False, quantize=reference_quantize):
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
                module.weight.copy_(quantize(module.weight, bits, 1 if isinstance(module, Conv1D) else 0))
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
    assert "- quantization backend: simulated (each weight rounded in place with quantize_rows" in card
    report = tmp_path / "report.md"
    write_report([load_run(out)], [], report, None)
    text = report.read_text()
    assert "Δloss int4" in text and "--msam_eval_quantization" in text


# ---------------------------------------------------------------------------------------------
# backend="torchao": real weight-only quantization with torchao's configs, on a copy of the model
# ---------------------------------------------------------------------------------------------


def torchao_scheme(w, bits, rows_along=0):
    """torchao 0.18's symmetric per-row weight-only scheme, as read in its source (choose_qparams_affine with
    MappingType.SYMMETRIC, then quantize_affine and dequantize_affine): integers in [qmin, qmax] = [-2^(b-1),
    2^(b-1) - 1], zero point 0, s = max|w_row| / ((qmax - qmin) / 2), q = clamp(round(w * (1 / s)), qmin, qmax) * s."""
    x = w if rows_along == 0 else w.t()
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=1, keepdim=True) / ((high - low) / 2)
    q = torch.clamp(torch.round(x * (1.0 / s)), low, high) * s
    return q if rows_along == 0 else q.t()


def per_tensor_scheme(w, bits, rows_along=0):
    """A wrong reference: torchao's grid with one scale for the whole tensor."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = w.abs().max() / ((high - low) / 2)
    return torch.clamp(torch.round(w * (1.0 / s)), low, high) * s


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)  # float32: torchao quantizes float32, bfloat16 and float16 weights
    with torch.no_grad():  # wider weights, so that 3 bits visibly move the loss
        for p in model.parameters():
            p.mul_(4)
    return model


def lm_batches(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]


def test_torchao_deltas_equal_its_scheme_and_the_model_is_untouched():
    """Llama, head tied to the input embeddings: torchao's Δloss (Int8WeightOnlyConfig at 8 bits,
    IntxWeightOnlyConfig below) equals the reference that applies torchao's scheme to a copy (the tied embedding
    quantized with the head), and not the simulated scheme's nor a per-tensor scale's; the caller's model is bitwise
    unchanged, still tied, in its mode."""
    pytest.importorskip("torchao")
    model = tiny_llama().train()
    before = copy.deepcopy(model.state_dict())
    batches = lm_batches(50)
    got = quantization_sensitivity(model, batches, bits=(8, 4, 3), backend="torchao")
    assert list(got) == [8, 4, 3]
    for bits in (8, 4, 3):
        loss, accuracy = reference_delta(model, batches, bits, causal=True, quantize=torchao_scheme)
        assert got[bits]["loss"] == pytest.approx(loss, abs=1e-6)
        assert got[bits]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for bits in (4, 3):
        for wrong in (reference_quantize, per_tensor_scheme):
            assert abs(got[bits]["loss"] - reference_delta(model, batches, bits, causal=True, quantize=wrong)[0]) > 1e-3
    assert abs(got[3]["loss"]) > abs(got[8]["loss"]) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bitwise
    assert all(m.training for m in model.modules())  # its mode back
    assert model.lm_head.weight is model.model.embed_tokens.weight and type(model.lm_head.weight) is torch.nn.Parameter
    # The backend named in each entry: torchao's version and config, and its grid.
    assert got[8]["backend"].startswith("torchao 0.")
    assert "Int8WeightOnlyConfig(granularity=PerRow())" in got[8]["backend"]
    int4 = "IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0), mapping_type=SYMMETRIC)"
    assert int4 in got[4]["backend"]
    assert "integers in [-4, 3], scale max|w_row|/3.5" in got[3]["backend"]
    simulated = quantization_sensitivity(model, batches, bits=(4,))
    assert simulated[4]["backend"].startswith("simulated") and "max|w_row|/7" in simulated[4]["backend"]


def test_torchao_converts_gpt2_conv1d_to_linear_and_says_so():
    """GPT-2's Conv1D (torchao's tensors implement F.linear, not torch.addmm): turned into nn.Linear in the copy, each
    output column quantized as torchao quantizes a row; the entry counts the converted layers."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)
    before = copy.deepcopy(model.state_dict())
    batches = lm_batches(40)
    got = quantization_sensitivity(model, batches, bits=(4,), backend="torchao")
    loss, _ = reference_delta(model, batches, 4, causal=True, quantize=torchao_scheme)
    assert got[4]["loss"] == pytest.approx(loss, abs=1e-6)
    assert abs(got[4]["loss"] - reference_delta(model, batches, 4, causal=True)[0]) > 1e-3  # not the simulated one
    assert got[4]["backend"].endswith("; 8 GPT-2 Conv1D layer(s) converted to nn.Linear (weight transposed) first")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(isinstance(m, Conv1D) for m in (model.transformer.h[0].attn.c_attn, model.transformer.h[1].mlp.c_proj))


def test_backend_errors(monkeypatch):
    """An unknown backend; torchao missing (hidden from the import system): pip install "hf-msam[quantization]", also
    when a trainer with --msam_quantization_backend torchao is built; an invalid flag value."""
    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    model, batches = tiny_llama(), lm_batches(50)
    with pytest.raises(ValueError, match="backend must be one of 'simulated', 'torchao', got 'int4'"):
        quantization_sensitivity(model, batches, backend="int4")
    with pytest.raises(ValueError, match="--msam_quantization_backend must be 'simulated' or 'torchao'"):
        MSAMTrainingArguments("unused", msam_quantization_backend="bitsandbytes")
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=r'pip install "hf-msam\[quantization\]"'):
        quantization_sensitivity(model, batches, backend="torchao")
    args = MSAMTrainingArguments("unused", report_to="none", use_cpu=True, msam_eval_quantization=True,
                                 msam_quantization_backend="torchao")  # fmt: skip
    with pytest.raises(ImportError, match=r'pip install "hf-msam\[quantization\]"'):
        MSAMTrainer(model=model, args=args)


def test_torchao_refuses_what_it_cannot_run():
    """float64 weights (torchao's quantize_affine takes float32, bfloat16, float16), a bit width it has no config
    for: errors naming the weight, or the widths."""
    pytest.importorskip("torchao")
    model, batches = tiny_llama(), lm_batches(50)
    with pytest.raises(ValueError, match="backend='torchao' quantizes to 2 to 8 bits"):
        quantization_sensitivity(model, batches, bits=(4, 9), backend="torchao")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight is torch\.float64"):
        quantization_sensitivity(model.double(), batches, bits=(4,), backend="torchao")


def test_torchao_flag_reaches_evaluate_the_model_card_and_compare(tmp_path):
    """--msam_quantization_backend torchao: the evaluation's deltas are torchao's (equal to the function's on the same
    batches), the model card names the backend, and `hf-msam compare` shows it in a column next to a simulated run."""
    pytest.importorskip("torchao")
    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    out = tmp_path / "run"
    args = MSAMTrainingArguments(str(out), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                                 msam_eval_quantization=True, msam_quantization_backend="torchao",
                                 msam_flatness_batches=2)  # fmt: skip
    data = bert_data(8)
    trainer = MSAMTrainer(model=tiny_bert(seed=3).float(), args=args, eval_dataset=data)
    metrics = trainer.evaluate()
    direct = quantization_sensitivity(trainer.model, [stack(data[:4]), stack(data[4:])], backend="torchao")
    simulated = quantization_sensitivity(trainer.model, [stack(data[:4]), stack(data[4:])])
    for bits in (8, 4, 3):
        assert metrics[f"eval_int{bits}_loss_delta"] == pytest.approx(direct[bits]["loss"], rel=1e-9, abs=1e-12)
    assert metrics["eval_int3_loss_delta"] != pytest.approx(simulated[3]["loss"], rel=1e-3)
    trainer.save_state()
    torch.save(trainer.args, out / "training_args.bin")
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert "- quantization backend: torchao 0." in card and "IntxWeightOnlyConfig below" in card
    assert load_run(out).settings["msam_quantization_backend"] == "torchao"
    plain = Run(name="plain", directory=tmp_path, log_history=[{"step": 1, "eval_int3_loss_delta": 0.5}], global_step=1,
                results={}, settings={"msam_rho": 0.05}, landscape=None)  # fmt: skip
    report = tmp_path / "report.md"
    write_report([load_run(out), plain], [], report, None)
    lines = report.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    column = [cell.strip() for cell in header.split("|")].index("quantization")
    cells = [[cell.strip() for cell in line.split("|")][column] for line in lines if line.startswith("| `")]
    assert cells == ["torchao", "simulated"]
    assert "`--msam_quantization_backend`" in report.read_text()
    # Runs that all used the default: no column (reports unchanged).
    write_report([plain], [], report, None)
    assert "quantization |" not in report.read_text() and "msam_quantization_backend" not in report.read_text()
