#!/usr/bin/env bash
# Fine-tune model A (a checkpoint) on dataset B with the recommended settings.
#
#   PRETRAIN_MODEL='runs/ocec_hq/v8/ocec_best_epoch*.pt' DATA_ROOT_B=/data/b OUTPUT_DIR=runs/ocec_b \
#       bash scripts/train_finetune.sh [--background] [extra ocec train flags...]
#
# Every variable below can be set in the environment. Extra arguments go to `ocec train` unchanged
# (a flag given twice: the later one wins). With PRETRAIN_MODEL and DATA_ROOT_B unset, the script runs a
# small demo end to end on synthetic data (dataset A, model A, then the fine-tune on dataset B).
# DRY_RUN=1 prints the resolved configuration and command without running them.
# See docs/finetune.md for what each setting does and what to change when results are poor.
set -euo pipefail

PRETRAIN_MODEL="${PRETRAIN_MODEL:-}"        # checkpoint file, run folder, or a quoted glob (best F1 wins)
DATA_ROOT_B="${DATA_ROOT_B:-}"              # parquet file or folder of dataset B
OUTPUT_DIR="${OUTPUT_DIR:-runs/ocec_finetune}"
EPOCHS="${EPOCHS:-150}"
BATCH_SIZE="${BATCH_SIZE:-256}"
LR="${LR:-}"                                # empty: the --pretrain default, 1e-3 (measured: docs/finetune.md)
BACKBONE_LR="${BACKBONE_LR:-}"              # empty: same as LR
HEAD_LR="${HEAD_LR:-}"
MARGIN_LR="${MARGIN_LR:-}"
WARMUP_EPOCHS="${WARMUP_EPOCHS:-}"          # empty: the --pretrain default, 1
RECIPE="${RECIPE:-}"                        # empty: full; or lp-ft, surgical, progressive
BN_ADAPT="${BN_ADAPT:-1}"                   # 1: re-estimate BatchNorm statistics on B first (AdaBN)
EMA_DECAY="${EMA_DECAY:-}"                  # e.g. 0.999 for long runs: validate and keep averaged weights
EXTRA_TRAIN_ROOT="${EXTRA_TRAIN_ROOT:-}"    # e.g. the output of ocec pseudo-label: added to every epoch
PLATEAU_FACTOR="${PLATEAU_FACTOR:-0.5}"
PLATEAU_PATIENCE="${PLATEAU_PATIENCE:-5}"
WEIGHT_DECAY="${WEIGHT_DECAY:-1e-4}"
DROPOUT="${DROPOUT:-0.3}"
MARGIN_METHOD="${MARGIN_METHOD:-}"          # empty: keep the checkpoint's
STAGES="${STAGES:-}"                        # e.g. 1:0:1e-4,11:0.5:3e-5,40:1:1.5e-5
MIX_DATA_ROOT="${MIX_DATA_ROOT:-}"          # dataset A, to mix in against forgetting
MIX_RATIO="${MIX_RATIO:-0.3}"
EXTRA_VAL_ROOT="${EXTRA_VAL_ROOT:-}"        # dataset A, to watch its F1 each epoch
NUM_WORKERS="${NUM_WORKERS:-4}"
DEVICE="${DEVICE:-auto}"
NPROC="${NPROC:-1}"                         # >1: that many processes (GPUs) under torchrun; BATCH_SIZE is the global batch
SEED="${SEED:-42}"
USE_AMP="${USE_AMP:-0}"
BACKGROUND="${BACKGROUND:-0}"
DRY_RUN="${DRY_RUN:-0}"
DEMO_DIR="${DEMO_DIR:-runs/finetune_demo}"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python || command -v python3)
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "train_finetune.sh: error: NPROC=$NPROC: not a positive integer" >&2; exit 2; }
launcher=("$PYTHON" -m)
if ((NPROC > 1)); then
    launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m)
fi

passthrough=()
for arg in "$@"; do
    if [[ "$arg" == "--background" ]]; then BACKGROUND=1; else passthrough+=("$arg"); fi
done

die() { echo "train_finetune.sh: error: $*" >&2; exit 2; }
ocec() { "$PYTHON" -m ocec "$@"; }

# A checkpoint setting -> what --pretrain receives. A glob resolves to the match with the highest
# F1 in its name (ocec_best_epochXXXX_f1_Y.YYYY.pt), never simply the newest file; matches without
# an F1 in the name are all passed on, and ocec picks by the F1 recorded inside them.
resolve_checkpoint() {
    local pattern="$1"
    if [[ -d "$pattern" || -f "$pattern" ]]; then
        printf '%s\n' "$pattern"
        return
    fi
    local matches=()
    shopt -s nullglob
    # shellcheck disable=SC2206  # the pattern is meant to expand
    matches=($pattern)
    shopt -u nullglob
    ((${#matches[@]} > 0)) || return 0  # nothing matches: the caller decides
    local best
    best=$(printf '%s\n' "${matches[@]}" | sed -n 's/.*_f1_\([0-9][0-9.]*\)\.pt$/\1\t&/p' | sort -t$'\t' -k1,1gr | head -n 1 | cut -f2)
    if [[ -n "$best" ]]; then
        printf '%s\n' "$best"
    else
        printf '%s\n' "${matches[@]}"
    fi
}

if [[ -z "$PRETRAIN_MODEL" && -z "$DATA_ROOT_B" ]]; then
    echo "PRETRAIN_MODEL and DATA_ROOT_B are not set: running the demo on synthetic data in $DEMO_DIR"
    if [[ "$DRY_RUN" != 1 ]]; then
        [[ -f "$DEMO_DIR/data_a/dataset.parquet" ]] || ocec synth --out "$DEMO_DIR/data_a" --rows "${DEMO_ROWS_A:-3000}" --seed 0 --style a
        [[ -f "$DEMO_DIR/data_b/dataset.parquet" ]] || ocec synth --out "$DEMO_DIR/data_b" --rows "${DEMO_ROWS_B:-1200}" --seed 1 --style b
        if ! compgen -G "$DEMO_DIR/model_a/v*/ocec_best_epoch*.pt" >/dev/null; then
            ocec train --data_root "$DEMO_DIR/data_a" --output_dir "$DEMO_DIR/model_a" --epochs 6 \
                --base_channels 16 --batch_size 64 --lr 2e-3 --warmup_epochs 1 --num_workers 0 --device "$DEVICE"
        fi
    fi
    PRETRAIN_MODEL="$DEMO_DIR/model_a/v*/ocec_best_epoch*.pt"
    DATA_ROOT_B="$DEMO_DIR/data_b"
    OUTPUT_DIR="$DEMO_DIR/finetune_b"
    EXTRA_VAL_ROOT="${EXTRA_VAL_ROOT:-$DEMO_DIR/data_a}"
    # demo scale: 4 epochs on 1,200 images (the defaults above are for 400k)
    EPOCHS=4; BATCH_SIZE=64; LR=1e-3; WARMUP_EPOCHS=1; PLATEAU_PATIENCE=2; NUM_WORKERS=0
fi
[[ -n "$PRETRAIN_MODEL" ]] || die "PRETRAIN_MODEL is not set (a checkpoint, run folder or quoted glob)"
[[ -n "$DATA_ROOT_B" ]] || die "DATA_ROOT_B is not set (a parquet file or folder)"

# An extra flag overrides its variable (ocec keeps the last value given), so the banner shows what runs.
declare -A FLAG_VARIABLE=(
    [--epochs]=EPOCHS [--batch_size]=BATCH_SIZE [--lr]=LR [--backbone_lr]=BACKBONE_LR [--head_lr]=HEAD_LR
    [--margin_lr]=MARGIN_LR [--warmup_epochs]=WARMUP_EPOCHS [--recipe]=RECIPE [--ema_decay]=EMA_DECAY
    [--extra_train_root]=EXTRA_TRAIN_ROOT [--plateau_factor]=PLATEAU_FACTOR [--plateau_patience]=PLATEAU_PATIENCE
    [--weight_decay]=WEIGHT_DECAY [--dropout]=DROPOUT [--margin_method]=MARGIN_METHOD [--stages]=STAGES
    [--mix_data_root]=MIX_DATA_ROOT [--mix_ratio]=MIX_RATIO [--extra_val_root]=EXTRA_VAL_ROOT
    [--num_workers]=NUM_WORKERS [--device]=DEVICE [--seed]=SEED [--output_dir]=OUTPUT_DIR [--data_root]=DATA_ROOT_B
)
for ((i = 0; i < ${#passthrough[@]}; i++)); do
    flag="${passthrough[i]}"
    if [[ "$flag" == --*=* ]]; then value="${flag#*=}"; flag="${flag%%=*}"; else value="${passthrough[i + 1]:-}"; fi
    case "$flag" in
        --no_bn_adapt) BN_ADAPT=0 ;;
        --bn_adapt) BN_ADAPT=1 ;;
        --use_amp) USE_AMP=1 ;;
        *) [[ -n "${FLAG_VARIABLE[$flag]:-}" ]] && printf -v "${FLAG_VARIABLE[$flag]}" '%s' "$value" ;;
    esac
done

# What the run checks first, a dry run checks too; only the demo's model A may be missing (it trains first).
demo_dry_run=0
[[ "$DRY_RUN" == 1 && "$PRETRAIN_MODEL" == "$DEMO_DIR/model_a/v*/ocec_best_epoch*.pt" ]] && demo_dry_run=1
[[ -e "$DATA_ROOT_B" || "$demo_dry_run" == 1 ]] || die "DATA_ROOT_B=$DATA_ROOT_B: no such file or folder"
mapfile -t checkpoints < <(resolve_checkpoint "$PRETRAIN_MODEL")
if ((${#checkpoints[@]} == 0)); then
    [[ "$demo_dry_run" == 1 ]] || die "PRETRAIN_MODEL=$PRETRAIN_MODEL: no such file, folder or matching checkpoint"
    checkpoints=("$PRETRAIN_MODEL")
fi

cmd=(ocec train --pretrain "${checkpoints[@]}" --data_root "$DATA_ROOT_B" --output_dir "$OUTPUT_DIR"
     --epochs "$EPOCHS" --batch_size "$BATCH_SIZE"
     --plateau_factor "$PLATEAU_FACTOR" --plateau_patience "$PLATEAU_PATIENCE" --weight_decay "$WEIGHT_DECAY"
     --dropout "$DROPOUT" --num_workers "$NUM_WORKERS" --device "$DEVICE" --seed "$SEED")
[[ -n "$LR" ]] && cmd+=(--lr "$LR")
[[ -n "$WARMUP_EPOCHS" ]] && cmd+=(--warmup_epochs "$WARMUP_EPOCHS")
[[ -n "$RECIPE" ]] && cmd+=(--recipe "$RECIPE")
[[ "$BN_ADAPT" == 0 ]] && cmd+=(--no_bn_adapt)
[[ -n "$EMA_DECAY" ]] && cmd+=(--ema_decay "$EMA_DECAY")
[[ -n "$EXTRA_TRAIN_ROOT" ]] && cmd+=(--extra_train_root "$EXTRA_TRAIN_ROOT")
[[ -n "$BACKBONE_LR" ]] && cmd+=(--backbone_lr "$BACKBONE_LR")
[[ -n "$HEAD_LR" ]] && cmd+=(--head_lr "$HEAD_LR")
[[ -n "$MARGIN_LR" ]] && cmd+=(--margin_lr "$MARGIN_LR")
[[ -n "$MARGIN_METHOD" ]] && cmd+=(--margin_method "$MARGIN_METHOD")
[[ -n "$STAGES" ]] && cmd+=(--stages "$STAGES")
[[ -n "$MIX_DATA_ROOT" ]] && cmd+=(--mix_data_root "$MIX_DATA_ROOT" --mix_ratio "$MIX_RATIO")
[[ -n "$EXTRA_VAL_ROOT" ]] && cmd+=(--extra_val_root "$EXTRA_VAL_ROOT")
[[ "$USE_AMP" == 1 ]] && cmd+=(--use_amp)
cmd+=("${passthrough[@]}")

echo "== fine-tune configuration"
echo "checkpoint      : ${checkpoints[*]}"
echo "dataset B       : $DATA_ROOT_B"
echo "output dir      : $OUTPUT_DIR"
echo "epochs          : $EPOCHS (warmup ${WARMUP_EPOCHS:-1, the --pretrain default}), batch $BATCH_SIZE"
echo "learning rates  : lr ${LR:-1e-3 (the --pretrain default)}, backbone ${BACKBONE_LR:-=lr}, head ${HEAD_LR:-=lr}, margin ${MARGIN_LR:-=lr}"
echo "recipe          : ${RECIPE:-full}, BatchNorm adaptation $([[ "$BN_ADAPT" == 0 ]] && echo off || echo on), EMA ${EMA_DECAY:-off}"
echo "plateau         : factor $PLATEAU_FACTOR, patience $PLATEAU_PATIENCE"
echo "regularisation  : weight decay $WEIGHT_DECAY, dropout $DROPOUT"
echo "margin method   : ${MARGIN_METHOD:-from the checkpoint}"
echo "stages          : ${STAGES:-none (whole network trains)}"
echo "mix             : ${MIX_DATA_ROOT:+$MIX_DATA_ROOT at $MIX_RATIO}${MIX_DATA_ROOT:-none}"
echo "extra val       : ${EXTRA_VAL_ROOT:-none}"
echo "extra train     : ${EXTRA_TRAIN_ROOT:-none}"
echo "extra flags     : ${passthrough[*]:-none}"
echo "processes       : $NPROC$( ((NPROC > 1)) && echo " (torchrun; batch $BATCH_SIZE is global)")"
echo "command         : ${launcher[*]} ${cmd[*]}"

if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
fi
if [[ "$BACKGROUND" == 1 ]]; then
    mkdir -p "$OUTPUT_DIR/logs"
    log="$OUTPUT_DIR/logs/finetune_$(date +%Y%m%d_%H%M%S).log"
    nohup "${launcher[@]}" "${cmd[@]}" >"$log" 2>&1 &
    echo "running in the background (pid $!); log: $log"
    echo "follow it with: tail -f $log"
else
    "${launcher[@]}" "${cmd[@]}"
fi
