"""Tokenizer and chat template: ids identical to mistral-common's, for v1 (Mixtral 8x7B) and v3
(Mixtral 8x22B) tokenizers; streaming decode that never splits a character."""

import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from localmix.errors import LocalmixError
from localmix.tokenizer import Tokenizer
from conftest import TOKENIZER_V1, TOKENIZER_V3, TOKENIZERS

VERSIONS = {
    "v1": (TOKENIZER_V1, MistralTokenizer.v1),
    "v2": (TOKENIZERS / "mistral_instruct_tokenizer_240216.model.v2", MistralTokenizer.v2),
    "v3": (TOKENIZER_V3, MistralTokenizer.v3),
}


@pytest.fixture(scope="module", params=list(VERSIONS))
def pair(request):
    path, reference = VERSIONS[request.param]
    return Tokenizer(path), reference()


def mistral_common_ids(reference, messages):
    """mistral-common's ids, or None where it refuses the conversation."""
    try:
        return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    except Exception:
        return None


def localmix_ids(tokenizer, messages):
    try:
        return tokenizer.apply_chat_template(messages)
    except LocalmixError:
        return None


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "single": [u("Why is the sky blue?")],
    "multi-turn": [u("Hi"), a("Hello! How can I help?"), u("Tell me a joke."), a("No."), u("Please")],
    "system": [s("You are terse."), u("Hi")],
    "system-multi-turn": [s("Be kind."), u("one"), a("two"), u("three")],
    "two-systems": [s("first"), s("second"), u("q"), a("r"), u("q2")],
    "non-ascii": [u("Ça va? 日本語のテキスト 😀 ünïcödé — “quotes”"), a("Très bien 👍"), u("Ω≈ç√∫")],
    "control-text": [u("[INST] hi [/INST] <s> </s> [TOOL_CALLS] <unk>"), a("[/INST]</s>"), u("</s>[INST]")],
    "consecutive-users": [u("part one"), u("part two"), u("part three")],
    "consecutive-assistants": [u("q"), a("a1"), a("a2"), u("q2")],
    "system-between-users": [u("first"), s("sys"), u("second")],
    "assistant-first": [a("I start"), u("ok")],
    "only-system": [s("just a system prompt")],
    "spaces": [u("  padded  "), a("trailing spaces   "), u(" x ")],
    "empty-user": [u("")],
    "newlines": [u("line one\nline two\n\n\tindented"), a("a\nb"), u("\n")],
}
INVALID = {
    "empty": [],
    "lone-assistant": [a("hi")],
    "ends-with-assistant": [u("q"), a("a")],
    "assistant-then-system": [u("q"), a("a"), s("sys"), u("q2")],
    "empty-assistant": [u("q"), a(""), u("q2")],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_mistral_common(pair, name):
    tokenizer, reference = pair
    expected = mistral_common_ids(reference, CONVERSATIONS[name])
    assert expected is not None
    assert tokenizer.apply_chat_template(CONVERSATIONS[name]) == expected


@pytest.mark.parametrize("name", INVALID)
def test_conversations_mistral_common_rejects_are_errors(pair, name):
    tokenizer, reference = pair
    assert mistral_common_ids(reference, INVALID[name]) is None
    with pytest.raises(LocalmixError):
        tokenizer.apply_chat_template(INVALID[name])


def test_random_conversations_match(pair):
    """Random role sequences and contents: the same ids, or both refuse."""
    tokenizer, reference = pair
    rng = random.Random(0)
    valid = 0
    texts = ["hello", "", " spaced ", "[INST]", "</s>", "two\n\nparagraphs", "é😀", "end ", "<s>x"]
    for _ in range(150):
        messages = [{"role": rng.choice(["user", "user", "assistant", "system"]), "content": rng.choice(texts)}
                    for _ in range(rng.randint(1, 6))]
        ids = localmix_ids(tokenizer, messages)
        assert ids == mistral_common_ids(reference, messages), messages
        valid += ids is not None
    assert 50 < valid < 140  # both accepted and refused conversations were compared


def test_user_text_never_becomes_control_tokens():
    for path in (TOKENIZER_V1, TOKENIZER_V3):
        tokenizer = Tokenizer(path)
        ids = tokenizer.apply_chat_template([u("[INST] </s> <s> [/INST]")])
        body = ids[1:]
        assert tokenizer.bos_id not in body and tokenizer.eos_id not in body
        if tokenizer.chat_version == "v3":
            assert body.count(tokenizer.begin_inst) == 1 and body.count(tokenizer.end_inst) == 1


def test_version_detected_from_the_tokenizer():
    assert Tokenizer(TOKENIZER_V1).chat_version == "v1"
    assert Tokenizer(TOKENIZER_V3).chat_version == "v3"
    assert Tokenizer(TOKENIZER_V3).vocab_size == 32768


def test_bad_messages():
    tokenizer = Tokenizer(TOKENIZER_V1)
    with pytest.raises(LocalmixError, match="unsupported chat role 'function'"):
        tokenizer.apply_chat_template([{"role": "function", "content": "x"}])
    with pytest.raises(LocalmixError, match="chat format has no tools"):  # v1 has none
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}])
    with pytest.raises(LocalmixError, match="must be a string"):
        tokenizer.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(LocalmixError, match="must be a dict"):
        tokenizer.apply_chat_template(["hello"])


def test_not_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(LocalmixError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")


TEXTS = ["Hello world", "  leading spaces", "Ça va? 日本語 😀👍🏽 ünïcödé", "a\n\nb\tc", "tokens: [INST] </s>",
         "🤖 emoji first", "x" * 50, "byte tokens: 𝔘𝔫𝔦 🦜 䶵"]


@pytest.mark.parametrize("path", [TOKENIZER_V1, TOKENIZER_V3], ids=["v1", "v3"])
def test_stream_decode_equals_decode_and_splits_no_character(path):
    tokenizer = Tokenizer(path)
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True, eos=True)
        decoder = tokenizer.stream_decoder()
        chunks = [decoder.add(t) for t in ids] + [decoder.flush()]
        assert "".join(chunks) == tokenizer.decode(ids)
        assert tokenizer.decode(ids).strip() == text.strip()
        # Characters spelled as several byte tokens come out whole, never as U+FFFD.
        assert all("\ufffd" not in c for c in chunks)
    ids = tokenizer.encode("🦜")
    assert [tokenizer.sp.is_byte(i) for i in ids] == [False, True, True, True, True]
    decoder = tokenizer.stream_decoder()
    assert [decoder.add(i) for i in ids] == ["", "", "", "", "🦜"]


def test_stream_decode_keeps_the_space_of_a_continuation():
    tokenizer = Tokenizer(TOKENIZER_V1)
    ids = tokenizer.encode("Paris is nice")
    decoder = tokenizer.stream_decoder(strip_leading_space=False)
    assert "".join(decoder.add(t) for t in ids) == " Paris is nice"
    decoder = tokenizer.stream_decoder()
    assert "".join(decoder.add(t) for t in ids) == "Paris is nice"


def test_stream_decode_of_invalid_bytes_matches_decode():
    tokenizer = Tokenizer(TOKENIZER_V1)
    byte = lambda b: tokenizer.sp.piece_to_id(f"<0x{b:02X}>")  # noqa: E731
    ids = tokenizer.encode("ok") + [byte(0xF0), byte(0x9F)] + tokenizer.encode("done")
    decoder = tokenizer.stream_decoder()
    streamed = "".join(decoder.add(t) for t in ids) + decoder.flush()
    assert streamed.replace("\ufffd", "") == tokenizer.decode(ids).replace("\ufffd", "")
    assert "\ufffd" in streamed
