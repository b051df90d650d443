#!/usr/bin/env bash
# The GPU profiling campaign (issues 3 and 8): real fine-tuning steps on one CUDA GPU,
# recorded as JSON Lines for `memplan validate` / `memplan calibrate`. Groups run in
# priority order and resume, so repeated calls (10 minutes each on the device tool)
# walk through the whole campaign; then, here: `memplan calibrate` and
# `memplan validate --extrapolate profiles/cuda-h100.jsonl`.
#
# Usage, from the repository root on a CUDA machine:
#   benchmarks/gpu_campaign.sh [OUT_DIR]        # default OUT_DIR: $OUT, else profiles/
# Environment: BUDGET_S (default 560) stops starting new groups once spent; a group
# that runs past it is stopped with SIGTERM, which keeps every finished record.
# If a .whl/ folder exists (bitsandbytes, peft, transformers wheels), it is
# installed into /tmp/site first. Records already present for this GPU (in
# OUT_DIR or profiles/) are skipped: run it again to resume.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${BUDGET_S:-560}
outdir=${1:-${OUT:-profiles}}
mkdir -p "$outdir"

if compgen -G ".whl/*.whl" >/dev/null; then
  if [ ! -d /tmp/site/bitsandbytes ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

mp() { python3 -c 'import sys; from memplan.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g' | cut -d- -f1)
rec="$outdir/cuda-$slug.jsonl"
if [ ! -f "$rec" ] && [ -f "profiles/cuda-$slug.jsonl" ] && [ "$outdir" != profiles ]; then
  cp "profiles/cuda-$slug.jsonl" "$rec"   # resume from the records already committed
fi
echo "gpu: $gpu -> $rec"
python3 -c 'import torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", b.__version__)'

ckpt=/tmp/memplan-ckpt
common=(--device cuda --steps 3 --run-timeout 300 --checkpoint-dir "$ckpt" --out "$rec")
grids=$(mktemp -d)

group() {  # group NAME ARGS...: one campaign, stopped with SIGTERM at the budget
  local name=$1; shift
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 40 ]; then echo "== $name: skipped, budget spent"; return; fi
  echo "== $name ($left s left)"
  timeout -s TERM -k 30 "$left" python3 -c 'import sys; from memplan.cli import main; sys.exit(main(sys.argv[1:]))' \
    profile "${common[@]}" "$@"
  echo "== $name: status $?"
}

# 1. Llama-2-7B at full depth: bf16 LoRA and NF4 + double-quant QLoRA, r=8 on q_proj,v_proj.
group llama2-7b-headline -m llama2-7b -r 8 --lora-targets q_proj,v_proj -s 512 -b 1 -q bf16
group llama2-7b-headline-nf4 -m llama2-7b -r 8 --lora-targets q_proj,v_proj -s 512 -b 1 -q nf4 --double-quant

# 2a. Llama-2-7B: 8-bit and paged optimizers, int8 LoRA (the grid sample, 2b, runs last).
group llama2-7b-optimizers -m llama2-7b -q nf4 --double-quant -r 64 --lora-targets all-linear -s 512 -b 1 \
  --optimizer adamw_8bit --optimizer paged_adamw_8bit
group llama2-7b-optimizers-bf16 -m llama2-7b -q bf16 -r 8 --lora-targets q_proj,v_proj -s 512 -b 4 \
  --optimizer adamw_8bit --optimizer paged_adamw_8bit
group llama2-7b-int8 -m llama2-7b -q int8 -r 8 --lora-targets q_proj,v_proj -s 512 -b 1
group llama2-7b-int8-long -m llama2-7b -q int8 -r 64 --lora-targets all-linear -s 2048 -b 1 --grad-checkpointing

# 3. TinyLlama-1.1B full fine-tuning (bf16 weights, AdamW and 8-bit AdamW).
group tinyllama-full -m tinyllama-1.1b --method full -q bf16 -s 512 -b 1 -b 4 --optimizer adamw --optimizer adamw_8bit
rm -rf "$ckpt"/tinyllama-*

# 4. Llama-3-8B QLoRA: the 128k vocabulary makes the logits the largest activation.
group llama3-8b-nf4 -m llama3-8b -q nf4 -r 8 --lora-targets q_proj,v_proj -s 512 -s 2048 -b 1
rm -rf "$ckpt"/llama3-8b-*

# 5. Mistral-7B QLoRA (GQA, 8 KV heads).
group mistral-7b-nf4 -m mistral-7b -q nf4 -r 8 --lora-targets q_proj,v_proj -s 1024 -b 1
rm -rf "$ckpt"/mistral-7b-*

# 2b. A sample of the Llama-2-7B LoRA/QLoRA grid (largest group, so last).
cat >"$grids/llama2.yaml" <<'EOF'
defaults: {model: llama2-7b, device: cuda, lora_rank: [8, 64], lora_targets: [[q_proj, v_proj], all-linear],
           seq_len: [512, 2048], batch_size: [1, 4], grad_checkpointing: [false, true]}
grids:
  - {quant: bf16}
  - {quant: nf4, double_quant: [false, true]}
EOF
group llama2-7b-grid --grid "$grids/llama2.yaml" --sample 16 --seed 3

# ---- The calibration campaign (issue 8): breadth first; every group resumes. ----
# 6. Llama-2-13B QLoRA at full depth: the check of the per-layer extrapolation from --layers 4/8.
group llama2-13b-full-depth -m llama2-13b -q nf4 --double-quant -r 8 --lora-targets q_proj,v_proj -s 512 -b 1
rm -rf "$ckpt"/llama2-13b-*

# 7. 70B and Mixtral through truncation at two depths (memplan validate --extrapolate).
group llama2-70b-layers -m llama2-70b -q nf4 --double-quant -r 8 --lora-targets q_proj,v_proj -s 512 -b 1 --layers 4 --layers 8
group llama3-70b-layers -m llama3-70b -q nf4 -r 16 --lora-targets all-linear -s 1024 -b 1 --grad-checkpointing --layers 4 --layers 8
group mixtral-layers -m mixtral-8x7b -q nf4 -r 8 --lora-targets q_proj,v_proj -s 512 -b 1 --layers 2 --layers 4
rm -rf "$ckpt"/llama2-70b-* "$ckpt"/llama3-70b-* "$ckpt"/mixtral-*

# 8. Mixed precision: fp32 master weights under bf16 autocast (LoRA keeps bf16 weight copies).
group autocast -m tinyllama-1.1b --method full -q fp32 --autocast bf16 -s 512 -b 1 -b 4
group autocast-lora -m llama2-7b -q fp32 --autocast bf16 -r 8 --lora-targets q_proj,v_proj -s 512 -b 1

# 9. Full fine-tuning of a second small model; Llama-2-7B at rank 256; more of the grid.
group qwen2.5-1.5b-full -m qwen2.5-1.5b --method full -q bf16 -s 512 -b 1 --optimizer adamw --optimizer adamw_8bit
group llama2-7b-r256 -m llama2-7b -r 256 --lora-targets all-linear -s 512 -b 1 -q bf16 -q nf4
group llama2-7b-grid-more --grid "$grids/llama2.yaml" --sample 40 --seed 3
rm -rf "$ckpt" "$grids"

echo "== summary ($(( $(date +%s) - start )) s)"
mp validate --measured "$rec"
mp validate --extrapolate "$rec"
