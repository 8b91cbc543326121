#!/usr/bin/env bash
# What to run when a CUDA machine is available (one script, a few minutes): the GPU-marked tests, then the rollout
# benchmark and the decode-step anatomy on the device, then our engine against vLLM (rollout throughput on the same
# w1_mla576 weights, and one GRPO step per engine split into rollout / weight sync / update). Run from the repository
# root after `make setup` and `pip install -e '.[vllm]'` (or with any env that has the dev, bench and vllm extras):
# bash scripts/gpu_check.sh [python]
set -euo pipefail
PY=${1:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv
$PY -m pytest -q -m gpu tests
$PY scripts/bench_rollout.py --device cuda --runs 5 --runs2 2
$PY scripts/bench_rollout.py --device cuda --dtype float32 --runs 3 --runs2 0
$PY scripts/profile_decode.py --device cuda
$PY -c "import vllm" || { echo "vllm does not import: pip install -e '.[vllm]'"; exit 1; }
$PY scripts/bench_rollout.py --device cuda --engine vllm --runs 5 --runs2 2
$PY scripts/bench_step.py --compare vllm --warmup 1 --steps 3
