#!/usr/bin/env bash
# KL divergence from the float model, localmix against llama.cpp, on the peers' random "mini"
# Mixtral (1.5 B parameters) and scripts/data/prose.txt (305 tokens).
#
#   bash scripts/quality_vs_llama.sh WORKDIR PEERS_PYTHON
#
# PEERS_PYTHON: the python of a venv set up as ../shared/peers/README.md says (torch,
# transformers, mistral-common, gguf, llama-cpp-python). On CPUs with AVX-512 or AMX build
# llama-cpp-python with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF": the native build crashed here.
# Takes about 30 minutes on 2 cores; uses LOCALMIX_HOME=WORKDIR/home.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
peers=$(cd "$here/../../shared/peers" && pwd)
work=$1 peers_python=$2
mkdir -p "$work" && cd "$work"
export LOCALMIX_HOME=$work/home
[ -f mini/config.json ] || "$peers_python" "$peers/make_hf_mixtral.py" mini --hidden 1024 --ffn 3584 --layers 16 --heads 16 --kv-heads 4
ids=$(python "$here/compare_quality.py" --base mini --text "$here/data/prose.txt" --print-ids)
for q in Q2_K IQ3_S Q3_K_M Q4_0 Q4_K_M Q8_0; do
  [ -f "llama-$q.gguf" ] || "$peers_python" "$peers/hf2gguf.py" mini "llama-$q.gguf" --quant $q
  [ -f "llama-$q.npy" ] || "$peers_python" "$peers/llama_logits.py" "llama-$q.gguf" "llama-$q.npy" $ids
done
for bits in 2 4 mixed 8; do
  [ -d "home/models/mini-q$bits" ] || localmix pull mini --bits $bits --name "mini-q$bits"
done
# per-expert widths at the sizes of llama.cpp's 2- and 3-bit files (localmix shrink: README)
sizes=""
for q in Q2_K IQ3_S Q3_K_M; do
  bytes=$(stat -c %s "llama-$q.gguf")
  [ -d "home/models/mini-$q-size" ] || localmix shrink mini-q4 --size "$bytes" --name "mini-$q-size"
  sizes="$sizes llama-$q.npy mini-$q-size"
done
python "$here/compare_quality.py" --base mini --text "$here/data/prose.txt" \
  mini-q2 $sizes llama-Q4_0.npy mini-q4 llama-Q4_K_M.npy mini-qmixed llama-Q8_0.npy mini-q8
