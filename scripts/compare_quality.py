"""KL divergence and top-1 agreement of quantized models against the float original, on one text:
localmix models (by name or folder) and llama.cpp logits saved by ../shared/peers/llama_logits.py
(.npy files, computed on the same token ids: `--print-ids` prints them).

    python scripts/compare_quality.py --base HF_DIR --text scripts/data/prose.txt mini-q4 mini-q8 llama-Q4_0.npy
"""

import argparse
from pathlib import Path

import numpy as np

import localmix
from localmix.quality import kl_divergence, perplexity, top1_agreement
from localmix.store import is_localmix_model, model_summary
from localmix.home import resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the float Hugging Face folder")
    p.add_argument("--text", required=True)
    p.add_argument("--print-ids", action="store_true", help="print the token ids and stop")
    p.add_argument("models", nargs="*", help="localmix model names or folders, or .npy logits")
    a = p.parse_args()

    base = localmix.load(a.base)
    ids = base.tokenizer.encode(Path(a.text).read_text(), bos=True)
    if a.print_ids:
        print(" ".join(map(str, ids)))
        return
    base_logits = base.logits(ids)
    params = sum(int(np.prod(w.shape)) for w in _matrices(base))
    print(f"{len(ids)} tokens; float perplexity {perplexity(base_logits, ids):.3f}")
    print(f"{'model':<28} {'KL (nats)':>10} {'top-1':>7} {'size MB':>9} {'bits/weight':>12}")
    for spec in a.models:
        if spec.endswith(".npy"):
            logits = np.load(spec)
            gguf = Path(spec).with_suffix(".gguf")
            size = gguf.stat().st_size if gguf.is_file() else None
        else:
            folder = resolve_model(spec)
            logits = localmix.load(folder).logits(ids)
            size = model_summary(folder)["disk_bytes"] if is_localmix_model(folder) else None
        kl, top1 = kl_divergence(base_logits, logits), top1_agreement(base_logits, logits)
        sized = f"{size / 1e6:9.1f} {8 * size / params:12.2f}" if size else f"{'':>9} {'':>12}"
        print(f"{spec:<28} {kl:10.5f} {top1:7.3f} {sized}")


def _matrices(model):
    w = model.transformer.weights
    yield w.embed
    if w.lm_head is not w.embed:
        yield w.lm_head
    for layer in w.layers:
        yield from (layer.wq, layer.wk, layer.wv, layer.wo)
        for e in layer.experts:
            yield from (e.w1, e.w2, e.w3)


if __name__ == "__main__":
    main()
