"""Host waits per decoded token on the MLX backend: every mx.eval (the backend's reads of MLX arrays
all go through it), counted over a greedy answer, the prompt aside; with the decode speed.

    python scripts/mlx_waits.py MODEL [--memory 2GB] [--backend mlx-f32] [-n 32]
"""

import argparse
import time

import mlx.core as mx

import localmix
from localmix.experts.budget import parse_memory

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--memory", type=parse_memory, default=None)
parser.add_argument("--backend", default="mlx-f32")
parser.add_argument("-n", type=int, default=32)
args = parser.parse_args()

model = localmix.load(args.model, backend=args.backend, memory=args.memory)
waits, evaluate = [], mx.eval
mx.eval = lambda *arrays: (waits.append(1), evaluate(*arrays))[1]
counts, times = [], []
for r in model.stream("Once upon a time", max_tokens=args.n + 1, temperature=0, repeat_penalty=1.0):
    counts.append(len(waits))
    times.append(time.perf_counter())
tokens = len(counts) - 1
print(f"{args.model} {args.backend} memory={args.memory}: {model.config.num_hidden_layers} layers, "
      f"{(counts[-1] - counts[0]) / tokens:.2f} host waits per decoded token, "
      f"{tokens / (times[-1] - times[0]):.2f} tok/s over {tokens} tokens")
