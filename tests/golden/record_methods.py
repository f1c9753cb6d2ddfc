"""Record each built-in method's parameters after a few training steps on a tiny model, as tests/golden/methods.json.

Run once on the code before a change that must not change behaviour (the move into the engine/integration
layout, issue 30), then `tests/engine/test_golden_methods.py` compares the code after it with these values (rtol 1e-6):

    OMP_NUM_THREADS=1 python tests/golden/record_methods.py

Each parameter is kept as a fingerprint (`fingerprint`). One thread, float64, SGD (AdamW where the method reads Adam's state), a tiny BERT (a LoRA-wrapped one for
Flat-LoRA), 3 optimizer steps of 8 rows in micro-batches of 3, 3, 2, both the vectorized and the sequential path.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "trainer")]  # tests/ and the trainer tests (tiny_bert, bert_data)

CASES = {
    "sam": dict(msam_method="sam"),
    "asam": dict(msam_method="sam", msam_adaptive=True, msam_rho=0.5),
    "gsam": dict(msam_method="gsam", msam_gsam_alpha=0.4),
    "fsam": dict(msam_method="fsam", msam_fsam_lambda=0.8),
    "looksam": dict(msam_method="looksam", msam_looksam_k=2),
    "momentum": dict(msam_method="momentum", optim_args="momentum=0.9"),
    "functional": dict(msam_method="functional"),
    "sam-adam": dict(msam_method="sam", msam_precondition="adam", optim="adamw_torch", learning_rate=0.01),
    "functional-adam": dict(msam_method="functional", msam_precondition="adam", optim="adamw_torch", learning_rate=0.01),
    "flat_lora": dict(msam_method="flat_lora", msam_flat_lora_sigma=0.1),
    "sam-interval-schedule": dict(msam_method="sam", msam_interval=2, msam_rho_schedule="lr", lr_scheduler_type="linear"),
}
PATHS = ("on", "off")
STEPS, BATCH, MICRO = 3, 8, 3


def model_for(case: str):
    from test_trainer_reference import tiny_bert

    model = tiny_bert(seed=0)
    if case == "flat_lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["query", "value"],
                          init_lora_weights=False)  # fmt: skip
        torch.manual_seed(1)
        model = get_peft_model(model, lora).double()
    return model


def train(case: str, vectorize: str) -> dict[str, list]:
    from test_trainer_reference import bert_data

    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    settings = {"optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant", "msam_rho": 0.1, **CASES[case]}
    model = model_for(case)
    with tempfile.TemporaryDirectory() as out:
        args = MSAMTrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=STEPS,
            max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", seed=0, msam_micro_batch_size=MICRO, msam_vectorize=vectorize,
            **settings,
        )  # fmt: skip
        trainer = MSAMTrainer(model=model, args=args, train_dataset=bert_data(BATCH * STEPS))
        trainer.train()
        path = trainer.msam_engine.path
    params = {n: fingerprint(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    return {"path": path, "params": params}


def fingerprint(t: torch.Tensor) -> list[float]:
    """What is kept of a parameter (the whole of every one would be megabytes): its first 4 values, its sum, its sum
    of absolute values and two fixed random projections (±1 signs from a seeded generator), each moved by any change
    of any element."""
    flat = t.flatten().double()
    g = torch.Generator().manual_seed(flat.numel())
    signs = torch.randint(0, 2, (2, flat.numel()), generator=g, dtype=torch.float64) * 2 - 1
    return [*flat[:4].tolist(), flat.sum().item(), flat.abs().sum().item(), *(signs @ flat).tolist()]


def main() -> None:
    torch.set_num_threads(1)
    out = {"versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "cases": {}}  # fmt: skip
    for case in CASES:
        for vectorize in PATHS:
            out["cases"][f"{case}/{vectorize}"] = train(case, vectorize)
            print(case, vectorize, out["cases"][f"{case}/{vectorize}"]["path"], flush=True)
    (HERE / "methods.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
