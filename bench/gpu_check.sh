#!/usr/bin/env bash
# The GPU checks in one go (about 10 minutes on one GPU): the CUDA-marked tests (bf16 against fp32, compiled
# FlexAttention against SDPA's math kernel, the pinned-memory undo copy, a 2-process pipeline on one GPU through
# gloo), then bench/throughput.py on the llama-125m preset (train.py against a plain loop with the same fast
# settings, MFU, peak memory, and a 2-stage row). Prints the tests' summary and the bench's JSON lines.
# Needs a Python with a CUDA build of torch and Flotilla's dependencies: PYTHON=... or .venv (launch/setup.sh with
# TORCH_SPEC naming a CUDA build; see docs/launching.md, GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU visible to this torch"; print("torch", torch.__version__, torch.cuda.get_device_name())' || exit 2
status=0
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || status=1
# llama-125m on one GPU: the byte tokenizer keeps the set-up short (a 32k BPE vocabulary would be trained first);
# the head then has 256 rows instead of 32k, which the FLOPs per token count accounts for.
"$PY" bench/throughput.py --steps ${STEPS:-30} --rounds 2 --two-stage config=llama-125m data.tokenizer=byte \
  train.batch_size=${BATCH:-16} || status=1
exit $status
