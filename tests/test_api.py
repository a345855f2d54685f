"""The Python API: load by path or name, logits, generate, stream, chat."""

import shutil

import numpy as np
import pytest

import localmix
from localmix.errors import LocalmixError


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return localmix.load(tiny_model_dir)


GREEDY = dict(temperature=0, repeat_penalty=1.0)


def test_load_by_name_from_localmix_home(tiny_model_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    m = localmix.load("tiny")
    assert m.config.num_local_experts == 4 and m.tokenizer.vocab_size == 32000
    with pytest.raises(LocalmixError, match="unknown model 'nope'"):
        localmix.load("nope")


def test_greedy_generation_follows_the_full_pass_argmax(model):
    prompt = model.tokenizer.encode("The capital of France is", bos=True)
    responses = list(model.stream(prompt, max_tokens=8, **GREEDY))
    tokens = [r.token for r in responses]
    ids = list(prompt)
    for token in tokens:  # each token is the argmax after everything before it, computed without cache
        assert token == int(np.argmax(model.logits(ids)[-1]))
        ids.append(token)
    assert [r.finish_reason for r in responses] == [None] * 7 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 9))
    last = responses[-1]
    assert last.prompt_tokens == len(prompt) and last.prompt_tps > 0 and last.generation_tps > 0
    assert last.peak_memory > 0
    assert "".join(r.text for r in responses) == continuation(model, prompt, tokens)


def continuation(model, prompt, tokens):
    """The text that tokens add after a prompt, from decoding everything at once."""
    decode = model.tokenizer.decode
    return decode(prompt + tokens)[len(decode(prompt)):]


def test_text_prompt_gets_bos_and_keeps_the_continuation_space(model):
    text = model.generate("The capital of France is", max_tokens=6, **GREEDY)
    ids = model.tokenizer.encode("The capital of France is", bos=True)
    tokens = [r.token for r in model.stream(ids, max_tokens=6, **GREEDY)]
    assert text == continuation(model, ids, tokens)


def test_same_seed_same_text(model):
    kw = dict(max_tokens=12, temperature=1.0, seed=3)
    assert model.generate("Once upon a time", **kw) == model.generate("Once upon a time", **kw)
    tokens = lambda seed: [r.token for r in model.stream("Once upon a time", 12, temperature=1.0, seed=seed)]  # noqa
    assert tokens(3) != tokens(4)


def test_chat_applies_the_template(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = model.tokenizer.apply_chat_template(messages)
    via_ids = [r.token for r in model.stream(ids, max_tokens=5, **GREEDY)]
    via_messages = [r.token for r in model.stream(messages, max_tokens=5, **GREEDY)]
    assert via_ids == via_messages
    answer = model.chat(messages, max_tokens=5, **GREEDY)
    assert answer == "".join(r.text for r in model.stream(messages, max_tokens=5, **GREEDY))
    assert not answer.startswith(" ")  # an answer starts a new text: no leading space
    assert model.chat("Hi", max_tokens=5, **GREEDY) == model.chat([messages[1]], max_tokens=5, **GREEDY)


def test_stop_string_cuts_the_text(model):
    full = model.generate("Tell me", max_tokens=20, **GREEDY)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    responses = list(model.stream("Tell me", max_tokens=20, stop=[stop], **GREEDY))
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == full[: full.index(stop)]


def test_eos_stops_generation(model, monkeypatch):
    """A wrapped forward pass that makes EOS the best token from the third step on."""
    real = model.transformer.__call__
    calls = []

    def forward(ids, cache, last_only=False, options=None):
        logits = real(ids, cache, last_only, options)
        calls.append(1)
        if len(calls) >= 3:
            logits[:, model.tokenizer.eos_id] = 1e9
        return logits
    monkeypatch.setattr(model, "transformer", type("T", (), {"__call__": staticmethod(forward),
                                                              "new_cache": model.transformer.new_cache,
                                                              "args": model.config,
                                                              "default_routing": model.transformer.default_routing})())
    responses = list(model.stream("Hi", max_tokens=50, **GREEDY))
    assert responses[-1].finish_reason == "stop" and responses[-1].token == model.tokenizer.eos_id
    assert len(responses) == 3


def test_limits(model):
    assert list(model.stream("Hi", max_tokens=0))[-1].finish_reason == "length"
    assert model.generate("Hi", max_tokens=0) == ""
    with pytest.raises(LocalmixError, match="max_tokens must be >= 0"):
        model.generate("Hi", max_tokens=-1)
    context = model.config.max_position_embeddings
    with pytest.raises(LocalmixError, match="more than the model's context"):
        model.generate([5] * (context + 10), max_tokens=1)
    with pytest.raises(LocalmixError, match="token ids must be in"):
        model.generate([1, 40000], max_tokens=1)
    # A generation that reaches the end of the context stops there: 3 tokens fill it, and a
    # fourth comes from the logits of the last position.
    responses = list(model.stream([5] * (context - 3), max_tokens=50, **GREEDY))
    assert responses[-1].finish_reason == "length" and len(responses) == 4


def test_a_base_model_continues_the_messages_text():
    """The demo is a base model (its manifest says so): chat() continues the messages' text, with no
    [INST] template around it, and a conversation reads as one text, a paragraph per message."""
    demo = localmix.load("demo")
    assert demo.base_model
    text = "And it came to pass"
    assert demo.chat(text, 12, **GREEDY) == demo.generate(text, 12, **GREEDY)
    conversation = [{"role": "system", "content": "In the beginning"}, {"role": "user", "content": text}]
    assert demo.chat(conversation, 12, **GREEDY) == demo.generate(f"In the beginning\n\n{text}", 12, **GREEDY)


def test_a_chat_model_is_not_a_base_model(model):
    assert not model.base_model  # its chat() applies the template: test_chat_applies_the_template


@pytest.mark.parametrize("load", ["idle", "busy", "busy from token 100", "idle from token 100"])
def test_thread_tuner_decodes_near_the_faster_thread_count(load, monkeypatch):
    """Token times as measured on the mini model (2 cores, README "A busy laptop"): idle, 2 threads
    16 ms and 1 thread 27 ms; with one busy process 2 threads 50 ms on average (a token is longer
    than the scheduler's time slice, so each one meets the stalls: 35-65 ms) and 1 thread 28 ms.
    Whatever the load does, the tuner's decoding stays within 10% of the faster count's (it loses
    some tokens to probing the other count and to noticing a change)."""
    import numba
    from localmix import threads
    from localmix.threads import ThreadTuner
    monkeypatch.setattr(numba, "set_num_threads", lambda n: None)
    rng = np.random.default_rng(0)
    busy = {"idle": lambda i: False, "busy": lambda i: True, "busy from token 100": lambda i: i >= 100,
            "idle from token 100": lambda i: i < 100}[load]

    def seconds(threads, i):
        if not busy(i):
            return 0.016 if threads == 2 else 0.027
        return rng.uniform(0.035, 0.065) if threads == 2 else 0.028

    token = 0  # the other processes' use of the CPU, as /proc/stat would tell it
    monkeypatch.setattr(threads, "cores_used_by_others", lambda since: 1.0 if busy(token) else 0.0)
    tuner, total, best = ThreadTuner(2), 0.0, 0.0
    tuner.start()
    for token in range(400):
        i = token
        took = seconds(tuner.current, i)
        tuner.record(took)
        total += took
        best += 0.016 if not busy(i) else 0.028
    assert total < 1.1 * best, (total, best, tuner.used)
    fixed = ThreadTuner(2, fixed=True)
    fixed.record(1.0)
    assert fixed.current == 2 and sum(fixed.used.values()) == 0  # a count the user chose stays
