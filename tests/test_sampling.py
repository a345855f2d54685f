"""Sampling: each truncation rule on hand-made distributions, penalties, seeds and stop strings."""

import numpy as np
import pytest

from localmix.errors import LocalmixError
from localmix.generate import StopStrings
from localmix.sampling import Sampler, SamplingParams, apply_repeat_penalty, token_probabilities

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04]))


def test_greedy_takes_the_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    assert all(sampler(logits, []) == 1 for _ in range(5))


def test_temperature_one_without_truncation_is_the_softmax():
    probs = token_probabilities(LOGITS, 1.0, 0, 1.0, 0.0)
    np.testing.assert_allclose(probs, [0.5, 0.25, 0.15, 0.06, 0.04], atol=1e-12)


def test_temperature_sharpens_and_flattens():
    cold, hot = token_probabilities(LOGITS, 0.5, 0, 1.0, 0.0), token_probabilities(LOGITS, 2.0, 0, 1.0, 0.0)
    assert cold[0] > 0.5 > hot[0]


def test_top_k():
    probs = token_probabilities(LOGITS, 1.0, 2, 1.0, 0.0)
    np.testing.assert_allclose(probs, [2 / 3, 1 / 3, 0, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = token_probabilities(LOGITS, 1.0, 0, 0.8, 0.0)  # 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.15
    np.testing.assert_allclose(probs, np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9)
    assert token_probabilities(LOGITS, 1.0, 0, 0.01, 0.0)[0] == 1.0


def test_min_p():
    probs = token_probabilities(LOGITS, 1.0, 0, 1.0, 0.3)  # keeps p >= 0.15
    np.testing.assert_allclose(probs, np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9)


def test_repeat_penalty():
    logits = np.array([2.0, -2.0, 1.0])
    np.testing.assert_allclose(apply_repeat_penalty(logits, [0, 1, 1], 2.0), [1.0, -4.0, 1.0])
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=3.0))
    assert sampler(np.array([2.0, 1.0]), history=[0]) == 1
    assert sampler(np.array([2.0, 1.0]), history=[]) == 0


def test_same_seed_same_samples_and_frequencies_follow_probabilities():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    draws_a = [a(LOGITS, []) for _ in range(4000)]
    assert draws_a == [b(LOGITS, []) for _ in range(4000)]
    other = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=8))
    assert draws_a[:50] != [other(LOGITS, []) for _ in range(50)]
    freq = np.bincount(draws_a, minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.06, 0.04], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=2), dict(repeat_penalty=0), dict(repeat_last_n=-1),
                                 # NaN passed every `<` test and sampled nothing; inf, bools and strings
                                 dict(repeat_penalty=float("nan")), dict(temperature=float("nan")),
                                 dict(top_p=float("nan")), dict(min_p=float("nan")), dict(temperature=float("inf")),
                                 dict(top_k=True), dict(top_k=2.5), dict(temperature="1"), dict(seed=-1),
                                 dict(seed="7"), dict(stop="a"), dict(stop=[1])])
def test_bad_parameters(bad):
    with pytest.raises(LocalmixError):
        SamplingParams(**bad).check()


def test_stop_strings_hold_back_possible_starts():
    stops = StopStrings(["</answer>", "STOP"])
    assert stops.feed("Hello </an") == ("Hello ", False)
    assert stops.feed("other") == ("</another", False)
    assert stops.feed(" ST") == (" ", False)
    assert stops.feed("OP and more") == ("", True)
    assert StopStrings([]).feed("anything</answer>") == ("anything</answer>", False)
    tail = StopStrings(["xyz"])
    assert tail.feed("abx") == ("ab", False) and tail.flush() == "x"
    overlap = StopStrings(["aab"])  # after "aa" a third "a" must keep the last two as a possible start
    assert overlap.feed("aaa") == ("a", False) and overlap.feed("b!") == ("", True)


def cut_reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """By brute force: the text before the stop string that ends first (the longest at a tie)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))], True
    return text, False


def test_stop_strings_match_brute_force_on_random_text_in_random_pieces():
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(list("ab"), rng.integers(0, 30)))
        stops = ["".join(rng.choice(list("ab"), rng.integers(1, 6))) for _ in range(rng.integers(1, 4))]
        cuts = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 6)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stream, shown, stopped = StopStrings(stops), "", False
        for piece in pieces:
            out, stopped = stream.feed(piece)
            shown += out
            if stopped:
                break
        if not stopped:
            shown += stream.flush()
        assert (shown, stopped) == cut_reference(text, stops), (text, stops, pieces)


def test_stop_strings_take_linear_time():
    """A 200k-character stop string against 400k characters of text that keep matching its start:
    re-searching the held text at each token took O(len(stop)^2) per token (a 2M-character stop
    string took minutes for two tokens); character by character it is well under a second."""
    import time
    stop = "a" * 200_000 + "b"
    stream = StopStrings([stop, "never"])
    start = time.perf_counter()
    shown = "".join(stream.feed("a" * 500)[0] for _ in range(800))
    assert len(shown) == 400_000 - 200_000 and len(stream.held) == 200_000
    assert stream.feed("b") == ("", True)
    assert time.perf_counter() - start < 10  # about 0.5 s; the old matcher: hours


def test_cancelled_ends_generation_between_tokens_and_prefill_chunks(tiny_model_dir):
    import localmix
    from localmix.generate import Generation, responses

    model = localmix.load(tiny_model_dir)
    ids = model.tokenizer.encode("Once upon a time there was", bos=True)
    params = SamplingParams(temperature=0, repeat_penalty=1.0)
    asked = []

    def cancelled():  # True from the 5th question on: prefill (1 chunk) + 3 tokens, then stop
        asked.append(1)
        return len(asked) >= 5

    answer = list(responses(Generation(model.transformer, model.tokenizer, ids, 50, params, cancelled=cancelled)))
    assert [r.finish_reason for r in answer] == [None, None, None, "cancelled"]
    assert answer[-1].token is None and answer[-1].generation_tokens == 3
    # Between prefill chunks: 2-token chunks, cancelled after the first one; no token is sampled.
    chunks = []
    generation = Generation(model.transformer, model.tokenizer, ids, 50, params, cancelled=lambda: len(chunks) >= 1)
    answer = list(responses(generation, prefill_step=2, on_prefill=lambda done, total: chunks.append(done)))
    assert chunks == [2] and [r.finish_reason for r in answer] == ["cancelled"]
    assert answer[0].generation_tokens == 0
