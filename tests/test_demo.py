"""The demo model that ships with localmix (scripts/train_demo.py: 9 M parameters, 8 experts top-2,
trained on the King James Bible): it must run right after install, with no network, and know
English. A model that knows nothing has a perplexity near its vocabulary's 32000; the bounds
below are ten times what the shipped model measures, so they fail only for a broken one."""

import re

import numpy as np

import localmix
from localmix.home import DEMO
from localmix.quality import perplexity

from test_cli import localmix_cli

UNSEEN = "And the man went up into the city, and he spake unto his brethren, saying, Fear not."


def test_the_demo_ships_with_the_package():
    assert (DEMO / "manifest.json").is_file() and localmix.load("demo").path == DEMO
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 40e6


def test_the_demo_knows_english():
    model = localmix.load("demo")
    unseen = model.tokenizer.encode(UNSEEN, bos=True)
    words = UNSEEN.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))
    shuffled_ids = model.tokenizer.encode(shuffled, bos=True)
    ppl, ppl_shuffled = perplexity(model.logits(unseen), unseen), perplexity(model.logits(shuffled_ids), shuffled_ids)
    print(f"perplexity {ppl:.1f}, words shuffled {ppl_shuffled:.1f}")  # 8.0 and 282 measured
    assert ppl < 80 and ppl_shuffled > 4 * ppl  # it knows words, and their order


def test_run_demo_offline(tmp_path):
    result = localmix_cli("run", "demo", "And it came to pass", "-n", "24", "--temperature", "0",
                          env={"LOCALMIX_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    words = re.findall(r"[A-Za-z]+", result.stdout)
    assert len(words) >= 10


def test_the_demo_routers_have_patterns():
    """Trained routers prefer some experts and keep them from token to token; random ones (the
    tests' other models) spread tokens almost evenly and reuse about a quarter (2 of 8 at random)."""
    from localmix import routing
    model = localmix.load("demo")
    text = " ".join([UNSEEN] * 6)
    stats = routing.summary(routing.collect(model, model.tokenizer.encode(text, bos=True)))
    print({k: np.round(v, 2).tolist() for k, v in stats.items() if k in ("max_over_mean", "reuse", "entropy")})
    assert stats["max_over_mean"].mean() > 1.8 and stats["reuse"].mean() > 0.35


def test_chat_with_the_demo_says_it_is_a_base_model(tmp_path):
    result = localmix_cli("chat", "demo", "-n", "8", stdin="And it came to pass\n", env={"LOCALMIX_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "demo is a base model: it continues the text" in result.stdout
    assert "[INST]" not in result.stdout
