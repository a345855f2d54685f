#!/usr/bin/env bash
# The Apple Silicon table, in one line on a Mac: localmix on MLX (Metal) and on the Numba kernels,
# mlx-lm and llama.cpp (Metal) on the same weights, a 512-token prompt and 128 decoded tokens.
#
#   pip install 'localmix[mlx]' mlx-lm && brew install llama.cpp   # once
#   bash scripts/mac_bench.sh NAME                                 # NAME: a model of `localmix list`
#
# mlx-lm and llama.cpp read localmix's own exports of NAME (`localmix export --format mlx-lm` and
# `--format gguf`: the same quantized values, no quantizing again), written once to
# $LOCALMIX_BENCH_DIR (default ~/localmix-bench). Each engine runs alone, one after the other; a
# missing one is said and skipped. The table (markdown, prompt and decode tokens per second) is what
# the README's Apple Silicon section will carry: paste it into an issue with `sysctl -n
# machdep.cpu.brand_string` and the macOS version.
set -euo pipefail

name=${1:?usage: bash scripts/mac_bench.sh NAME}
prompt=${PROMPT:-512}
decode=${DECODE:-128}
out=${LOCALMIX_BENCH_DIR:-$HOME/localmix-bench}
mkdir -p "$out"
rows=()

localmix_row() {  # backend
    local json
    json=$(localmix bench "$name" --backend "$1" -p "$prompt" -n "$decode" --json | tail -1)
    rows+=("| localmix $1 | $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.1f | %.1f" % (d["prefill_tok_s"], d["decode_tok_s"]))' "$json") |")
}

localmix_row mlx
localmix_row numba

if python3 -c "import mlx_lm" 2>/dev/null; then
    [ -d "$out/$name-mlx" ] || localmix export "$name" "$out/$name-mlx" --format mlx-lm
    line=$(python3 -m mlx_lm.benchmark --model "$out/$name-mlx" -p "$prompt" -g "$decode" -n 3 | grep '^Averages:')
    rows+=("| mlx-lm | $(python3 -c 'import re,sys; d=dict(re.findall(r"(\w+)=([\d.]+)", sys.argv[1])); print("%.1f | %.1f" % (float(d["prompt_tps"]), float(d["generation_tps"])))' "$line") |")
else
    echo "mlx-lm is not installed (pip install mlx-lm): its row is skipped" >&2
fi

if command -v llama-bench >/dev/null; then
    [ -f "$out/$name.gguf" ] || localmix export "$name" "$out/$name.gguf" --format gguf
    json=$(llama-bench -m "$out/$name.gguf" -p "$prompt" -n "$decode" -ngl 99 -o json)
    rows+=("| llama.cpp (Metal) | $(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); p=[x["avg_ts"] for x in r if x["n_prompt"]>0]; g=[x["avg_ts"] for x in r if x["n_gen"]>0]; print("%.1f | %.1f" % (p[0], g[0]))' "$json") |")
else
    echo "llama-bench is not installed (brew install llama.cpp): its row is skipped" >&2
fi

echo
echo "$name, prompt $prompt, decode $decode tokens ($(sysctl -n machdep.cpu.brand_string 2>/dev/null || uname -m))"
echo
echo "| engine | prompt tok/s | decode tok/s |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
