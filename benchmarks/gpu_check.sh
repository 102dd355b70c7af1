#!/usr/bin/env bash
# GPU check of the apo GPU backend, on one machine with one CUDA GPU, in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh            # from anywhere; it runs in the repository root
#
# 1. the gpu-marked tests (tests/test_gpu_backend.py), and the vllm-marked ones when vLLM is installed;
# 2. `apo train` for a few steps of a ~85M-parameter Llama built from a config (random weights, the
#    character tokenizer, builtin arithmetic), backend gpu with rollout vllm when vLLM is importable,
#    else rollout hf;
# 3. prints step time, tokens/s, rollout/train/sync split and peak GPU memory (PyTorch's allocator
#    and nvidia-smi's device total, which also counts vLLM's memory);
# 4. with two GPUs or more, 3 steps of the same recipe under torchrun on 2 of them.
#
# Needs python3 with a CUDA build of torch, transformers, peft, typer, rich, pyyaml, safetensors and
# pytest. Nothing is installed from the network. Pure-Python packages the image lacks (on the
# project's stock GPU image: pydantic, pydantic-core, annotated-types, typing-inspection) are
# installed from wheel files in $APO_WHEELS (default: .whl/ in the repository root) when that
# folder holds any. Fetch them on a machine with pip access, for the GPU machine's Python (3.12):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
#
# Environment: PYTHON (default python3), APO_WHEELS, APO_CHECK_STEPS (default 8).
# Exit status: 0 when every stage passed, 1 otherwise (each stage still runs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
STEPS=${APO_CHECK_STEPS:-8}
WORK=$(mktemp -d /tmp/apo-gpu-check.XXXXXX)
export APO_CACHE=$WORK/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
t_start=$SECONDS
stage() { echo; echo "== $* ($((SECONDS - t_start)) s)"; }

stage "environment"
wheels=${APO_WHEELS:-.whl}
if ! $PY -c "import pydantic, yaml, typer, rich, peft, safetensors" 2>/dev/null; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$wheels"/*.whl \
      || { echo "could not install the wheels in $wheels"; exit 1; }
    export PYTHONPATH=$WORK/site:$PYTHONPATH
  fi
  $PY -c "import pydantic, yaml, typer, rich, peft, safetensors" \
    || { echo "missing Python packages: carry their wheels in $wheels (see the header of $0)"; exit 1; }
fi
nvidia-smi -L || { echo "nvidia-smi found no GPU"; exit 1; }
$PY - <<'EOF' || exit 1
import torch, transformers
from backends._optional import is_cuda_available, vllm_problem, vllm_version
assert is_cuda_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}; "
      f"transformers {transformers.__version__}; vLLM {vllm_version() or 'absent'}"
      + (f" ({vllm_problem()})" if vllm_problem() else ""))
EOF
if $PY -c "from backends._optional import is_vllm_available as a; raise SystemExit(not a())"; then
  ROLLOUT=vllm
else
  ROLLOUT=hf
fi

stage "pytest -m gpu"
timeout 240 $PY -m pytest -m gpu tests/test_gpu_backend.py -q -p no:cacheprovider -o addopts="" -ra || status=1
if [ "$ROLLOUT" = vllm ]; then
  stage "pytest -m vllm"
  timeout 240 $PY -m pytest -m vllm tests/test_vllm_engine.py -q -p no:cacheprovider -o addopts="" -ra || status=1
fi

stage "training: $STEPS steps, backend gpu, rollout $ROLLOUT"
$PY - "$WORK" <<'EOF' || exit 1
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from apo_cli.models import build_char_tokenizer, tiny_config
work = Path(sys.argv[1]) / "llama-85m"
tok = build_char_tokenizer()
torch.manual_seed(0)
cfg = tiny_config(len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained(work)
tok.save_pretrained(work)
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {work}")
EOF
cat > "$WORK/recipe.yaml" <<EOF
# written by benchmarks/gpu_check.sh
run: {name: gpu-check, output_dir: $WORK/run, max_steps: $STEPS, seed: 0}
model: {name_or_path: $WORK/llama-85m}
data: {source: "builtin:arithmetic", task_kwargs: {level: 1, size: 2000}}
rewards:
  - {name: exact_match}
  - {name: length, weight: 1.0, kwargs: {target: 64}}
rollout: {group_size: 8, prompts_per_step: 16, max_new_tokens: 128}
algorithm: {objective: apo}
optim: {lr: 1.0e-5, micro_batch_size: 32}
checkpoint: {every: 1000, keep_last: 1}
logging: {dashboard: plain, samples_per_step: 0}
backend: {kind: gpu, rollout: $ROLLOUT, gpu_memory_utilization: 0.3, max_model_len: 512}
EOF
base_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "$WORK/smi.txt" 2>/dev/null &
smi=$!
timeout 300 $PY - "$WORK/recipe.yaml" <<'EOF' 2>&1 | tee "$WORK/train.log" || status=1
import atexit, runpy, sys
import torch

def peak():
    if torch.cuda.is_initialized():
        print(f"PEAK_TORCH_GIB {torch.cuda.max_memory_allocated() / 2**30:.2f} {torch.cuda.max_memory_reserved() / 2**30:.2f}")

atexit.register(peak)
sys.argv = ["apo", "train", sys.argv[1]]
runpy.run_module("apo_cli", run_name="__main__")
EOF
kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null

if [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ]; then
  stage "training under torchrun: 2 GPUs, 3 steps"
  timeout 240 $PY -m torch.distributed.run --standalone --nproc-per-node=2 -m apo_cli train "$WORK/recipe.yaml" \
    run.output_dir="$WORK/run-2gpu" run.max_steps=3 2>&1 | grep -v '^W[0-9]' | tail -5 || status=1
  [ "$(wc -l < "$WORK/run-2gpu/metrics.jsonl" 2>/dev/null)" = 3 ] || { echo "the 2-GPU run did not log 3 steps"; status=1; }
fi

stage "summary"
$PY - "$WORK" "$base_mib" "$ROLLOUT" <<'EOF' || status=1
import json, sys
from pathlib import Path
work, base, rollout = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
assert rows, "no metrics were written"
steady = rows[1:] or rows  # step 1 pays for warm-up (CUDA kernels, the engine's first sync)
mean = lambda k: sum(r.get(k, 0.0) for r in steady) / len(steady)
smi = [float(x) for x in (work / "smi.txt").read_text().split() if x.strip().replace(".", "").isdigit()]
print(f"rollout engine: {rollout}; steps: {len(rows)} (means over steps 2..{len(rows)})")
print(f"step time      {mean('step_time'):.2f} s   (rollout {mean('time/rollout'):.2f} s, train {mean('time/train'):.2f} s, "
      f"sync {mean('time/sync'):.3f} s; first step {rows[0]['step_time']:.2f} s)")
print(f"tokens/s       {mean('tokens_per_s'):.0f} completion tokens per second of step time "
      f"(mean length {mean('completions/mean_length'):.1f})")
if "sampling/logprob_diff_mean" in rows[-1]:
    print(f"engine vs trainer log-prob |diff|: mean {mean('sampling/logprob_diff_mean'):.4f}, "
          f"max {max(r.get('sampling/logprob_diff_max', 0) for r in rows):.4f}")
peak = [x.split()[1:] for x in (work / "train.log").read_text().splitlines() if x.startswith("PEAK_TORCH_GIB")]
if peak:
    print(f"peak GPU memory (PyTorch allocator) {peak[-1][0]} GiB allocated, {peak[-1][1]} GiB reserved")
if smi:
    print(f"peak GPU memory (nvidia-smi, whole device) {max(smi) / 1024:.2f} GiB ({(max(smi) - base) / 1024:.2f} GiB above idle)")
EOF
echo
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - t_start)) s (work folder $WORK)"
exit $status
