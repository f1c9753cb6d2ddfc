"""hf_msam.batches: packed rows cut at sequence boundaries, preference batches cut by pairs (no TRL needed)."""

from __future__ import annotations

import pytest
import torch

from hf_msam.batches import (
    SEQUENCE_BOUNDS_KEY,
    SequenceBoundsRecorder,
    Splitter,
    label_token_count,
    split_packed,
    split_pairs,
    splitter_for,
)
from hf_msam.msam import split_batch


def packed_batch(lengths=(3, 2, 4, 1, 2)):
    """One row holding sequences of `lengths`, as TRL's padding-free collator lays it out (built by hand here)."""
    total = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.arange(100, 100 + total)[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    return {
        "input_ids": ids, "labels": labels, "position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
        "max_length_q": max(lengths), "max_length_k": max(lengths), "seq_idx": seq_idx,
    }  # fmt: skip


def test_packed_row_is_cut_at_sequence_boundaries():
    batch = packed_batch()
    micro = split_packed(batch, 2)
    assert len(micro) == 3  # sequences (3, 2), (4, 1), (2)
    tokens = [(0, 5), (5, 10), (10, 12)]
    lengths = [(3, 2), (4, 1), (2,)]
    for mb, (a, b), lens in zip(micro, tokens, lengths):
        assert torch.equal(mb["input_ids"], batch["input_ids"][:, a:b])
        assert torch.equal(mb["labels"], batch["labels"][:, a:b])
        assert torch.equal(mb["position_ids"], torch.cat([torch.arange(n) for n in lens])[None])
        assert mb["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
        assert mb["cu_seq_lens_k"].tolist() == mb["cu_seq_lens_q"].tolist()
        assert mb["max_length_q"] == mb["max_length_k"] == max(lens)
        assert mb["seq_idx"].tolist() == [sum(([i] * n for i, n in enumerate(lens)), [])]
    # Label tokens add up: each micro-batch's count of shifted labels is its share of the batch's.
    assert sum(int(label_token_count(mb)) for mb in micro) == int(label_token_count(batch)) == 12 - 5
    assert split_packed(batch, 5)[0] is batch and split_packed(batch, None)[0] is batch


def test_packed_row_from_position_ids_only():
    """transformers' DataCollatorWithFlattening gives position_ids (and no attention mask), no cu_seq_lens."""
    batch = {k: v for k, v in packed_batch((2, 3, 1)).items() if k in ("input_ids", "labels", "position_ids")}
    micro = split_packed(batch, 1)
    assert [mb["input_ids"].shape[1] for mb in micro] == [2, 3, 1]


def test_recorder_keeps_boundaries_as_ints_and_splitter_takes_them_out():
    batch = packed_batch()
    recorder = SequenceBoundsRecorder(lambda features: {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    made = recorder([{}])
    assert made[SEQUENCE_BOUNDS_KEY] == (0, 3, 5, 9, 10, 12)
    # On an accelerator the boundary tensors cannot be read without a sync: the recorded ints are used instead
    # (here the tensors are on the meta device, where reading them fails).
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "position_ids"):
        made[key] = made[key].to("meta")
    cut = Splitter("rows").for_batch(made)
    assert SEQUENCE_BOUNDS_KEY not in made  # the model never sees it
    assert cut.packed and cut.layout == "packed"
    assert [mb["input_ids"].shape[1] for mb in cut.split(made, 2)] == [5, 5, 2]
    plain = {"input_ids": torch.ones(4, 3), "attention_mask": torch.ones(4, 3), "labels": torch.ones(4, 3)}
    assert SEQUENCE_BOUNDS_KEY not in SequenceBoundsRecorder(lambda f: dict(plain))([{}])
    cut = Splitter("rows").for_batch(dict(plain))
    assert cut.split is split_batch and cut.layout == "rows" and not cut.packed
    assert Splitter("pairs").for_batch(dict(plain)).layout == "pairs"


def test_packed_batch_with_several_rows_is_refused():
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long), "position_ids": torch.arange(6).repeat(2, 1)}
    with pytest.raises(ValueError, match="--msam_micro_batch_size None.*--padding_free/--packing"):
        split_packed(batch, 1)


def test_preference_batch_is_cut_by_pairs():
    n = 5
    batch = {
        "input_ids": torch.arange(2 * n)[:, None].repeat(1, 3), "attention_mask": torch.ones(2 * n, 3),
        "ref_chosen_logps": torch.arange(n) * 1.0, "margin": torch.arange(n) * 2.0, "beta": 0.1,
    }  # fmt: skip
    micro = split_pairs(batch, 2)
    assert [mb["input_ids"][:, 0].tolist() for mb in micro] == [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9]]
    assert [mb["ref_chosen_logps"].tolist() for mb in micro] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    assert [mb["margin"].tolist() for mb in micro] == [[0.0, 2.0], [4.0, 6.0], [8.0]]
    assert all(mb["beta"] == 0.1 for mb in micro)
    assert [Splitter("pairs").size_fn(mb) for mb in micro] == [2, 2, 1]
    with pytest.raises(ValueError, match="preference batch"):
        split_pairs({"input_ids": torch.ones(3, 2)}, 1)


def fake_trainer(class_name: str, module: str):
    return type(class_name, (), {"__module__": module})()


def test_splitter_for_trainers():
    assert splitter_for(fake_trainer("Trainer", "transformers.trainer")).layout == "rows"
    assert splitter_for(fake_trainer("SFTTrainer", "trl.trainer.sft_trainer")).layout == "rows"
    assert splitter_for(fake_trainer("DPOTrainer", "trl.trainer.dpo_trainer")).layout == "pairs"
    assert splitter_for(fake_trainer("RewardTrainer", "trl.trainer.reward_trainer")).layout == "pairs"
    with pytest.raises(NotImplementedError, match="GRPOTrainer.*--msam_rho 0"):
        splitter_for(fake_trainer("GRPOTrainer", "trl.trainer.grpo_trainer"))
    assert splitter_for(fake_trainer("GRPOTrainer", "trl.trainer.grpo_trainer"), strict=False).layout == "rows"


def test_msam_trainer_on_a_flattened_batch_equals_reference(tmp_path):
    """The plain MSAMTrainer (no TRL) with transformers' DataCollatorWithFlattening: one padding-free row of 5
    sequences, micro-batches of 2, 2, 1 sequences weighted by label tokens; the reference runs each sequence alone."""
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
    from trl_helpers import msam_gradient, sgd_reference, token_nll_sum, write_tiny_llama

    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    llama = write_tiny_llama(tmp_path / "llama")
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 4, 6]
    data = []
    for n in lengths:
        ids = torch.randint(3, 20, (n,), generator=g).tolist()
        labels = [-100, -100, *ids[2:]]  # the first two tokens are "prompt"
        data.append({"input_ids": ids, "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64)
    args = MSAMTrainingArguments(
        str(tmp_path / "out"), per_device_train_batch_size=5, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to="none", use_cpu=True,
        save_strategy="no", train_sampling_strategy="sequential", msam_rho=0.1, msam_micro_batch_size=2,
        remove_unused_columns=False,
    )  # fmt: skip
    MSAMTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening()).train()

    sequences = [(torch.tensor([d["input_ids"]]), torch.tensor([d["labels"]])) for d in data]
    groups = [sequences[0:2], sequences[2:4], sequences[4:5]]
    counts = [sum(int(lab[:, 1:].ne(-100).sum()) for _, lab in grp) for grp in groups]

    def loss_of(group, count):
        return lambda: sum(token_nll_sum(reference, ids, lab)[0] for ids, lab in group) / count

    gradient = msam_gradient(reference, [loss_of(grp, c) for grp, c in zip(groups, counts)], [c / sum(counts) for c in counts], rho=0.1)
    expected = sgd_reference(reference, gradient, lr=0.5)
    for name, p in model.named_parameters():
        # float64, yet the embedding update differs by ~3e-8 (of ~1e-1), like the plain step in test_trl.py
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_sequence_bounds_recorder_copies_and_pickles():
    # DataLoader workers started by spawn/forkserver pickle the collator: the wrapper must survive it.
    import copy
    import pickle

    from transformers import DataCollatorWithFlattening

    recorder = SequenceBoundsRecorder(DataCollatorWithFlattening())
    for clone in (copy.copy(recorder), pickle.loads(pickle.dumps(recorder))):
        assert isinstance(clone.collator, DataCollatorWithFlattening)
        assert clone.return_position_ids is True  # attributes of the wrapped collator show through
        batch = clone([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
        assert batch[SEQUENCE_BOUNDS_KEY] == (0, 3, 5)
