"""Train localmix's offline demo model: a small Mixtral (8 experts, top-2, the real Mixtral
tokenizer) on the King James Bible, then save it as a Hugging Face folder for `localmix pull`.

    apt-get install bible-kjv            # Debian's bible-kjv-text: the KJV text (public domain*)
    bible -f "Ge1:1-Re22:21" > kjv.txt   # all 31,102 verses, one per line
    python scripts/train_demo.py kjv.txt /tmp/demo-hf --minutes 30
    localmix pull /tmp/demo-hf --bits 4 --name demo

Corpus: the King James Version (1611) as packaged by Debian (bible-kjv-text 4.38, "Bible
Retrieval System" by Chip Chapin: "Users may copy, modify or distribute this file at will";
Debian's copyright file: "The copyright for the King James Version text of the Bible is
expired"). *In the United Kingdom the KJV remains under Crown letters patent.

Needs torch and transformers (the test extra). Runs on the CPU in the time given; the model is
transformers' MixtralForCausalLM, so localmix's float path is checked against the same code.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from make_random_checkpoint import tokenizer_file  # beside this script: mistral-common's tokenizer.model.v1

CONFIG = dict(vocab_size=32000, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
              rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=True, router_aux_loss_coef=0.02,
              output_router_logits=True, bos_token_id=1, eos_token_id=2, sliding_window=None)


def verses(path: Path) -> list[str]:
    """The text without its verse references ("Ge1:1 In the beginning..." -> "In the beginning...")."""
    return [re.sub(r"^\S+\d+:\d+\s+", "", line).strip() for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    torch.manual_seed(a.seed)
    import sentencepiece
    tokenizer_path = tokenizer_file(None)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    # One stream of tokens: each chapter's verses as a paragraph, a BOS before each.
    ids = []
    for verse in verses(a.corpus):
        ids += sp.encode(verse) if ids else [1] + sp.encode(verse)
    data = torch.tensor(ids, dtype=torch.long)
    held_out = data[-20_000:]
    data = data[:-20_000]
    print(f"{len(ids)} tokens ({len(data)} for training)")
    model = MixtralForCausalLM(MixtralConfig(**CONFIG))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, start, step = a.minutes * 60, time.time(), 0
    rng = np.random.default_rng(a.seed)
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        lr = a.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = rng.integers(0, len(data) - a.seq - 1, a.batch)
        batch = torch.stack([data[o:o + a.seq] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f} s", flush=True)
        step += 1
    model.eval()
    with torch.no_grad():
        chunks = held_out[: len(held_out) // a.seq * a.seq].view(-1, a.seq)
        model.config.output_router_logits = False
        loss = model(input_ids=chunks, labels=chunks).loss.item()
    print(f"held-out loss {loss:.3f} (perplexity {math.exp(loss):.1f}) after {step} steps")
    model.config.output_router_logits = False
    model.save_pretrained(a.out, safe_serialization=True)
    config = json.loads((a.out / "config.json").read_text())
    config["localmix_base_model"] = True  # trained on plain text: `localmix run` completes, no chat template
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    (a.out / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    prompt = torch.tensor([[1] + sp.encode("And it came to pass")])
    sample = model.generate(prompt, max_new_tokens=40, do_sample=False)
    print(sp.decode(sample[0].tolist()))


if __name__ == "__main__":
    main()
