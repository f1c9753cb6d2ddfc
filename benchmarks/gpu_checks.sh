#!/usr/bin/env bash
# GPU checks of hf-msam in one go (about 5 minutes on an H100/H200), from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_checks.sh      # OUT defaults to ./gpu_checks_out
#
# 1. versions and nvidia-smi; 2. precision: fp32/bf16/fp16 through MSAMTrainer (no host sync inside the step,
# one step against a plain-PyTorch mSAM step, finite AdamW/GradScaler steps); 3. FSDP2 through the Trainer
# (`accelerate launch --use_fsdp --fsdp_version 2`, one process) against the same run without FSDP, for SAM and
# for mSAM with 2 micro-batches; 4. benchmarks/step_time.py --device cuda (the main rows, then the methods rows
# if time is left). Each part runs under its own time limit; a failure does not stop the others. Every check
# prints a PASS/FAIL/SKIP line; a summary of them ends the output. Wheels in ./.whl (e.g. a newer transformers)
# are installed into /tmp/site first and put on the path. GPU_CHECKS_PARTS picks parts (default: all):
#     GPU_CHECKS_PARTS="versions fsdp" bash benchmarks/gpu_checks.sh
set -u
PARTS=" ${GPU_CHECKS_PARTS:-versions precision fsdp steptime} "  # also: sweep (the vectorized step), trl (SFT, DPO),
# cost (mSAM(8) against SAM through the Trainer, issue 31's measurement)
OUT=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$OUT"
TOTAL=${GPU_CHECKS_SECONDS:-380}  # the methods rows of step_time only run if they fit in this
START=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PYTORCH_NVML_BASED_CUDA_CHECK=1  # step_time forks its workers: keep CUDA uninitialized in the parent
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
RESULTS=$(mktemp)
WORK=$(mktemp -d)

part() {  # part NAME LIMIT_SECONDS COMMAND...: run under a time limit, keep its PASS/FAIL/SKIP lines
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/part.log"
    local rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL|SKIP) ' "$WORK/part.log" >>"$RESULTS"
    if [ "$rc" -ne 0 ] && ! grep -qE '^FAIL ' "$WORK/part.log"; then
        echo "FAIL $name: exit code $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')" | tee -a "$RESULTS"
    fi
    echo "=== $name done: rc=$rc at $((SECONDS - START))s"
}

# 1. versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[[ $PARTS == *" versions "* ]] && part versions 60 python3 benchmarks/gpu_checks.py versions

# 2. precision (fp32, bf16, fp16)
[[ $PARTS == *" precision "* ]] && part precision 150 python3 benchmarks/gpu_checks.py precision --json "$OUT/precision.json"

# 3. FSDP2 through the Trainer on one GPU, against the same run without FSDP
ACCEL=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
       --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
       --fsdp_transformer_layer_cls_to_wrap BertLayer --fsdp_cpu_ram_efficient_loading false
       --fsdp_reshard_after_forward true --fsdp_offload_params false)
for method in sam msam; do
    [[ $PARTS == *" fsdp "* ]] || break
    part "fsdp2-$method-plain" 90 python3 benchmarks/gpu_checks.py fsdp-train --method $method --out "$WORK/plain_$method.pt"
    part "fsdp2-$method-accelerate" 120 "${ACCEL[@]}" benchmarks/gpu_checks.py fsdp-train --method $method --out "$WORK/fsdp_$method.pt"
    if [ ! -f "$WORK/fsdp_$method.pt" ]; then  # accelerate refused: FSDP2 through TrainingArguments under torchrun
        part "fsdp2-$method-torchrun" 120 python3 -m torch.distributed.run --nproc_per_node 1 \
            benchmarks/gpu_checks.py fsdp-train --method $method --args-fsdp --out "$WORK/fsdp_$method.pt"
    fi
    part "fsdp2-$method-compare" 60 python3 benchmarks/gpu_checks.py fsdp-compare "$WORK/fsdp_$method.pt" \
        "$WORK/plain_$method.pt" --json "$OUT/fsdp2_$method.json"
done

# 5 (before 4, which may exit early). The vectorized step on the GPU, bf16: mSAM with k = 2, 4, 8, 16 micro-batches on
# both paths against SAM, for a small BERT, BERT-base (batch 32, seq 128; target mSAM(8)/SAM <= 1.25), ViT-B/16 and a
# ~110M Llama with LoRA (Flat-LoRA rows included); then the methods' kernels per step against their floors.
#     GPU_CHECKS_PARTS="versions sweep" bash benchmarks/gpu_checks.sh      # about 10 minutes on an H200
if [[ $PARTS == *" sweep "* ]]; then
    SWEEP=(python3 benchmarks/step_time.py --device cuda --counts 2 4 8 16 --steps 10 --warmup 3 --bf16)
    part sweep-bert-small 100 "${SWEEP[@]}" --model bert --hidden-size 128 --layers 2 --heads 2 --json "$OUT/sweep_bert_small.json"
    part sweep-bert-base 150 "${SWEEP[@]}" --model bert --hidden-size 768 --layers 12 --heads 12 --vocab-size 30522 \
        --json "$OUT/sweep_bert_base.json"
    part sweep-vit-b16 150 "${SWEEP[@]}" --model vit --hidden-size 768 --layers 12 --heads 12 --image-size 224 \
        --patch-size 16 --json "$OUT/sweep_vit_b16.json"
    part sweep-llama-lora 150 "${SWEEP[@]}" --model llama --hidden-size 768 --layers 12 --heads 12 --vocab-size 32000 \
        --seq-len 256 --lora 16 --json "$OUT/sweep_llama_lora.json"
    part kernels 60 python3 benchmarks/step_time.py --device cuda --count-kernels --steps 5 --warmup 2 \
        --rows msam_sam msam_gsam msam_fsam msam_looksam5 msam_momentum --json "$OUT/kernels.json"
    for f in sweep_bert_small sweep_bert_base sweep_vit_b16 sweep_llama_lora kernels; do
        [ -f "$OUT/$f.json" ] && echo "PASS $f: $OUT/$f.json" >>"$RESULTS"
    done
fi

# 6. TRL SFT and DPO (TRL's defaults: the fused LM head) on CUDA: plain, SAM, mSAM(4) sequential and vectorized, with
#    peak memory. GPU_CHECKS_PARTS="versions trl" bash benchmarks/gpu_checks.sh
if [[ $PARTS == *" trl "* ]]; then
    part trl-step-time 150 python3 benchmarks/trl_step_time.py --trainer both --batch 16 --micro_batch 4 --steps 8 \
        --json "$OUT/trl_step_time.json"
    [ -f "$OUT/trl_step_time.json" ] && echo "PASS trl-step-time: $OUT/trl_step_time.json" >>"$RESULTS"
fi

# 7. mSAM(8) against SAM through the Trainer (benchmarks/trainer_cost.py), BERT, GPT-2, Llama, ViT, LoRA-Llama at the
#    small and medium sizes, fp32 and bf16. GPU_CHECKS_PARTS="versions cost" bash benchmarks/gpu_checks.sh
if [[ $PARTS == *" cost "* ]]; then
    for size in small medium; do
        part "cost-$size-fp32" 75 python3 benchmarks/trainer_cost.py --device cuda --size $size --rounds 2 --steps 12 \
            --json "$OUT/cost_${size}_fp32.json"
        part "cost-$size-bf16" 75 python3 benchmarks/trainer_cost.py --device cuda --bf16 --size $size --rounds 2 \
            --steps 12 --json "$OUT/cost_${size}_bf16.json"
    done
    for f in cost_small_fp32 cost_small_bf16 cost_medium_fp32 cost_medium_bf16; do
        [ -f "$OUT/$f.json" ] && echo "PASS $f: $OUT/$f.json" >>"$RESULTS"
    done
fi

# 4. step time on CUDA: the main rows, then the methods rows if they fit
[[ $PARTS == *" steptime "* ]] || { echo "=== summary (after $((SECONDS - START))s)"; cat "$RESULTS"; ! grep -q '^FAIL ' "$RESULTS"; exit; }
part step-time-main 170 python3 benchmarks/step_time.py --device cuda --json "$OUT/step_time_main.json" \
    --rows trainer msam_rho0 msam_sam msam_mbs8 msam_mbs4
[ -f "$OUT/step_time_main.json" ] && echo "PASS step-time-main: $OUT/step_time_main.json" >>"$RESULTS"
LEFT=$((TOTAL - (SECONDS - START)))
if [ "$LEFT" -ge 90 ]; then
    part step-time-methods "$LEFT" python3 benchmarks/step_time.py --device cuda --json "$OUT/step_time_methods.json" \
        --rows msam_interval4 msam_looksam5 msam_momentum msam_gsam msam_fsam
    [ -f "$OUT/step_time_methods.json" ] && echo "PASS step-time-methods: $OUT/step_time_methods.json" >>"$RESULTS"
else
    echo "SKIP step-time-methods: only ${LEFT}s left" | tee -a "$RESULTS"
fi

echo "=== summary (after $((SECONDS - START))s)"
cat "$RESULTS"
! grep -q '^FAIL ' "$RESULTS"
