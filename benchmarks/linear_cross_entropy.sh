#!/usr/bin/env bash
# The fused-loss tables of BENCHMARKS.md: the three heads of the issue, on this machine's
# device (CUDA if present: bfloat16, 8192 tokens; else CPU: float32, fewer tokens).
# Each `lmloss bench` prints one markdown table; paste them into BENCHMARKS.md with the machine.
set -euo pipefail
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  for head in qwen2-0.5b llama3-8b gemma2-2b; do lmloss bench --head "$head" --repeats 10; done
else
  lmloss bench --head qwen2-0.5b --tokens 4096 --repeats 3
  lmloss bench --head qwen2-0.5b --tokens 4096 --repeats 3 --ignored 0.3 --methods floor,naive,torch,lmloss
  lmloss bench --head gemma2-2b --tokens 1024 --repeats 1
  lmloss bench --head llama3-8b --tokens 1024 --repeats 1
fi
