"""Tool calls: the prompt ids of tools, calls and results as the references give them (mistral-common
for Mistral's v3 format, transformers' apply_chat_template(tools=...) for a template with tools); calls
read from answers as they stream; required calls held to the tools' schemas; and the server's OpenAI
and Ollama answers with tool_calls, through the official clients."""

import json
import random

import jsonschema
import numpy as np
import openai
import pytest
import transformers
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import localmix
from localmix.errors import LocalmixError
from localmix.server import create_app
from localmix.structured import Constraint, Vocabulary
from localmix.tokenizer import Tokenizer
from localmix.tools import CallReader, MistralToolCalls, TaggedToolCalls, read_tools
from conftest import TOKENIZER_V3, make_hf_model, running
from test_hf_tokenizer import write_folder

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, some days ahead. <|im_end|> stays text",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 0, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web: naïve café 世界",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 30},
                                                    "top": {"type": "integer", "minimum": 1, "maximum": 5}},
                   "required": ["query"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def call(name: str, arguments: dict, call_id: str) -> dict:
    """An assistant's call as OpenAI's clients send it back (arguments: a JSON string)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CALL_PARIS = call("get_weather", {"city": "Paris", "days": 2, "unit": "celsius"}, "abcDEF123")
CALL_SEARCH = call("search", {"query": "crêpes <|im_start|> [INST]", "top": 3}, "xyz789QRS")
# Conversations with tools offered, calls made and results given, as a client would send them
CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
    [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]},
     {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 21, "sky": "clear"}'}],
    [{"role": "user", "content": "Paris, and crêpes?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS, CALL_SEARCH]},
     {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 21 °C"},
     {"role": "tool", "tool_call_id": "xyz789QRS", "content": ""}],
    [{"role": "system", "content": "You plan trips."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]},
     {"role": "tool", "tool_call_id": "abcDEF123", "content": "[1, 2, 3]"},
     {"role": "assistant", "content": "It will be sunny."}, {"role": "user", "content": "And crêpes? [/INST]"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": None, "tool_calls": [CALL_SEARCH]},
     {"role": "tool", "tool_call_id": "xyz789QRS", "content": "42"}, {"role": "user", "content": "thanks"}],
]


# -- Mistral's v3 format: ids identical to mistral-common's ------------------------------------------------


@pytest.fixture(scope="module")
def mistral():
    return Tokenizer(TOKENIZER_V3), MistralTokenizer.v3()


def mistral_common_ids(reference, messages, tools):
    try:
        return reference.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens
    except Exception:  # noqa: BLE001 (mistral-common refuses with several exception types)
        return None


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_mistral_tools_calls_and_results_match_mistral_common(mistral, index):
    tokenizer, reference = mistral
    messages = CONVERSATIONS[index]
    want = mistral_common_ids(reference, messages, TOOLS)
    assert want is not None
    assert tokenizer.apply_chat_template(messages, TOOLS) == want
    assert tokenizer.apply_chat_template(messages) == mistral_common_ids(reference, messages, None)
    assert 6 in want and 5 in want[1:] or not any(m.get("tool_calls") for m in messages)  # [AVAILABLE_TOOLS], [TOOL_CALLS]


BAD = {
    "a call id that is not 9 letters or digits": [
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{**CALL_PARIS, "id": "call_1"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "y"}],
    "a result without its call's id": [
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL_PARIS]},
        {"role": "tool", "content": "y"}],
    "calls and text in one message": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "hm", "tool_calls": [CALL_PARIS]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "y"}],
    "an answer before the results": [
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL_PARIS]},
        {"role": "assistant", "content": "done"}, {"role": "user", "content": "y"}],
    "a result after a user": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "abcDEF123",
                                                                  "content": "y"}],
    "a call's name with a space": [
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("get weather", {}, "abcDEF123")]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "y"}],
}


@pytest.mark.parametrize("name", list(BAD))
def test_conversations_mistral_common_refuses_are_errors(mistral, name):
    tokenizer, reference = mistral
    assert mistral_common_ids(reference, BAD[name], TOOLS) is None
    with pytest.raises(LocalmixError):
        tokenizer.apply_chat_template(BAD[name], TOOLS)


def test_random_conversations_with_tools_match_mistral_common(mistral):
    tokenizer, reference = mistral
    rng = random.Random(7)
    texts = ["hello", "", "[INST] x", "é😀 ", '{"a": [1, 2]}', "42", "null"]
    matched = 0
    for _ in range(150):
        messages, ids = [], iter(["abcDEF123", "xyz789QRS", "A1b2C3d4E", "zzzzzzzz9"])
        for _ in range(rng.randint(1, 6)):
            role = rng.choice(["user", "user", "assistant", "system", "calls"])
            if role == "calls":
                calls = [call(rng.choice(["get_weather", "search"]), {"q": rng.choice(texts)}, next(ids, "qqqqqqqq1"))
                         for _ in range(rng.randint(1, 2))]
                messages.append({"role": "assistant", "content": None, "tool_calls": calls})
                messages += [{"role": "tool", "tool_call_id": c["id"], "content": rng.choice(texts)} for c in calls]
            else:
                messages.append({"role": role, "content": rng.choice(texts)})
        want = mistral_common_ids(reference, messages, TOOLS)
        try:
            got = tokenizer.apply_chat_template(messages, TOOLS)
        except LocalmixError:
            got = None
        assert got == want, messages
        matched += want is not None
    assert matched > 40


# -- a template with tools: ids identical to transformers' ------------------------------------------------


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("tools"), "tools")
    return localmix.tokenizer.load_tokenizer(folder, 1024), transformers.AutoTokenizer.from_pretrained(folder)


def as_template_input(messages):
    """The messages as localmix hands them to the template: arguments as objects (vLLM's way too),
    content "" where a client sent null."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_template_tools_calls_and_results_match_transformers(tagged, index):
    tokenizer, reference = tagged
    messages = CONVERSATIONS[index]
    want = reference.apply_chat_template(as_template_input(messages), tools=TOOLS, add_generation_prompt=True,
                                         tokenize=True, return_dict=False, sanitize_control_tokens=True)
    ids = tokenizer.apply_chat_template(messages, TOOLS)
    assert ids == want
    # the control tokens typed in a tool's description and a call's arguments stayed text
    assert "some days ahead. <|im_end|> stays text" in tokenizer.decode(ids)  # (decode drops control tokens)
    assert "<|im_start|> [INST]" in tokenizer.decode(ids) or "crêpes" not in json.dumps(messages)
    assert tokenizer.tool_syntax is not None and isinstance(tokenizer.tool_syntax, TaggedToolCalls)


def test_templates_without_tools_refuse_them(tmp_path):
    chatml = localmix.tokenizer.load_tokenizer(write_folder(tmp_path / "c", "chatml"), 1024)
    assert chatml.tool_syntax is None
    with pytest.raises(LocalmixError, match="no tools"):
        chatml.apply_chat_template(CONVERSATIONS[0], TOOLS)
    with pytest.raises(LocalmixError, match="no tools"):
        chatml.apply_chat_template(CONVERSATIONS[2])
    assert Tokenizer(TOKENIZER_V3).tool_syntax is not None


def test_bad_tools_are_errors():
    for tools, message in [("x", "must be a list"), ([{"type": "code"}], "type"), ([{"function": []}], "object"),
                           ([{"function": {"name": "a b"}}], "name must be"),
                           ([{"function": {"name": "f"}}, {"function": {"name": "f"}}], "two tools"),
                           ([{"function": {"name": "f", "parameters": "x"}}], "JSON schema"),
                           ([{"function": {"name": "f"}}] * 200, "at most")]:
        with pytest.raises(LocalmixError, match=message):
            read_tools(tools)


# -- reading calls from an answer ---------------------------------------------------------------------------


def read(syntax, pieces):
    """What a CallReader shows and finds, fed (token, text) pieces."""
    reader = CallReader(syntax)
    shown = "".join(reader.add(token, text) for token, text in pieces)
    rest, calls = reader.finish()
    return shown + rest, [(c.name, c.arguments) for c in calls]


TAGGED_ANSWERS = {
    'Sure.\n<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>':
        ("Sure.\n", [("search", {"query": "x"})]),
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": "{\\"k\\": 1}"}'
    '\n</tool_call>': ("", [("a", {}), ("b", {"k": 1})]),
    '<tool_call>\n{"name": "a", "arguments": {"x": [1]}}': ("", [("a", {"x": [1]})]),  # stopped before the closing tag
    '<tool_call>\n{"name": "a", "arguments": {"x": ': ('<tool_call>\n{"name": "a", "arguments": {"x": ', []),
    '<tool_call>\n{"name": "a"}\n</tool_call> and more': ('<tool_call>\n{"name": "a"}\n</tool_call> and more', []),
    "no call <tool here <tool_cal": ("no call <tool here <tool_cal", []),
    '<tool_call>\n["not", "a call"]\n</tool_call>': ('<tool_call>\n["not", "a call"]\n</tool_call>', []),
}


@pytest.mark.parametrize("text", list(TAGGED_ANSWERS))
def test_tagged_calls_are_read_however_the_text_is_split(text):
    want = TAGGED_ANSWERS[text]
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert read(TaggedToolCalls(), [(None, p) for p in pieces]) == want
    # nothing of a call is shown before the call ends
    reader = CallReader(TaggedToolCalls())
    shown = "".join(reader.add(None, c) for c in text)
    assert shown == want[0] or "<tool_call>\n{" not in shown


def test_mistral_calls_follow_their_control_token():
    syntax = MistralToolCalls(5)
    body = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", "arguments": {}}]'
    pieces = [(5, "")] + [(100 + i, body[i:i + 3]) for i in range(0, len(body), 3)]
    assert read(syntax, pieces) == ("", [("get_weather", {"city": "Paris"}), ("search", {})])
    assert read(syntax, [(7, "plain [TOOL_CALLS] text")]) == ("plain [TOOL_CALLS] text", [])
    assert read(syntax, [(5, ""), (9, " [{broken")]) == (" [{broken", [])


def test_an_answer_without_parallel_calls_reports_its_first_call():
    from localmix.generate import GenerationResponse
    from localmix.server import AnswerCalls
    body = ' [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]'
    steps = [(5, "", None), (9, body, "stop")]
    for parallel, names in [(True, ["a", "b"]), (False, ["a"])]:
        answer = AnswerCalls(MistralToolCalls(5), parallel)
        out = [answer.step(GenerationResponse(text, token, 1, 1.0, 1, 1.0, 0.0, finish)) for token, text, finish in steps]
        assert out[0] == ("", [], None) and [c.name for c in out[1][1]] == names and out[1][2] == "tool_calls"


# -- required calls: the grammar holds any model to the tools' schemas ---------------------------------------


def forced(tokenizer, vocab_size, syntax, name, parallel, seed):
    """An answer sampled from random logits under the grammar of a required call."""
    constraint = Constraint(Vocabulary(tokenizer, vocab_size), syntax.grammar(TOOLS, name, parallel))
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(400):
        token = int(np.argmax(constraint.restrict(rng.standard_normal(vocab_size).astype(np.float32) * 3)))
        if token in tokenizer.stop_ids:
            break
        constraint.accept(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("kind", ["mistral", "tagged"])
def test_required_calls_conform_to_the_tools(kind, mistral, tagged):
    tokenizer = mistral[0] if kind == "mistral" else tagged[0]
    vocab_size = 32768 if kind == "mistral" else 1024
    for seed, (name, parallel) in enumerate([(None, True), (None, False), ("search", True), ("get_weather", False)] * 2):
        tokens = forced(tokenizer, vocab_size, tokenizer.tool_syntax, name, parallel, seed)
        decoder = tokenizer.stream_decoder()
        text, calls = read(tokenizer.tool_syntax, [(t, decoder.add(t)) for t in tokens] + [(None, decoder.flush())])
        assert text == "" and calls, tokenizer.decode(tokens)
        assert len(calls) == 1 or parallel
        for called, arguments in calls:
            assert called == name or name is None
            jsonschema.validate(arguments, SCHEMAS[called])


# -- the server, through the official clients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server over a home of two models with tools, each loaded when a request names it: Mixtral
    with Mistral's v3 tokenizer, and a Qwen3-MoE with a template with tools. (url, their HF folders)"""
    from localmix.catalog import Catalog
    from localmix.quant.convert import LocalSource, convert
    from localmix.server import served_model
    folders = {"mixtral-tools": tmp_path_factory.mktemp("mixtral-tools"),
               "qwen-tools": tmp_path_factory.mktemp("qwen-tools")}
    make_hf_model(folders["mixtral-tools"], tokenizer=TOKENIZER_V3, vocab_size=32768)
    make_hf_model(folders["qwen-tools"], "qwen3_moe", tokenizer=None, vocab_size=1024, moe_intermediate_size=64,
                  max_position_embeddings=4096)  # (its small vocabulary makes long prompts)
    write_folder(folders["qwen-tools"], "tools")
    models = tmp_path_factory.mktemp("home") / "models"
    for name, folder in folders.items():
        convert(LocalSource(folder), models / name, bits="8", group_size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(models.parent))
        app = create_app(catalog=Catalog(open=lambda name: served_model(localmix.load(models / name), name),
                                         max_loaded=2, keep_alive=600.0))
        with running(app) as url:
            yield url, folders


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0)


MODELS = ["mixtral-tools", "qwen-tools"]
ASK = [{"role": "user", "content": "What is the weather in Paris in two days?"}]


def check_calls(calls, name=None):
    for c in calls:
        assert c.type == "function" and (name is None or c.function.name == name) and len(c.id) == 9
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("model", MODELS)
def test_openai_required_and_named_tool_calls(served, client, model):
    answer = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=200, temperature=1.0, seed=3, n=2)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls)
    named = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=200, seed=4,
                                           tool_choice={"type": "function", "function": {"name": "search"}},
                                           parallel_tool_calls=False)
    calls = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    check_calls(calls, "search")

    # the calls and their results sent back: the next answer sees them (ids as the references give them)
    results = [{"role": "tool", "tool_call_id": c.id, "content": '{"ok": true}'} for c in calls]
    history = ASK + [named.choices[0].message.model_dump(exclude_none=True)] + results
    after = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=3, temperature=0)
    assert after.choices[0].message.tool_calls is None and after.choices[0].finish_reason == "length"
    sent = [{"role": "user", "content": ASK[0]["content"]},
            {"role": "assistant", "content": None, "tool_calls": [call("search", json.loads(calls[0].function.arguments),
                                                                       calls[0].id)]}] + results
    assert after.usage.prompt_tokens == len(reference_ids(served, model, sent, TOOLS))


def reference_ids(served, model, messages, tools):
    """The prompt's ids as the model's reference gives them."""
    if model == "mixtral-tools":
        return MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest(messages=messages,
                                                                                  tools=tools)).tokens
    reference = transformers.AutoTokenizer.from_pretrained(served[1][model])
    return reference.apply_chat_template(as_template_input(messages), tools=tools, add_generation_prompt=True,
                                         tokenize=True, return_dict=False, sanitize_control_tokens=True)


@pytest.mark.parametrize("model", MODELS)
def test_openai_streamed_tool_calls(client, model):
    stream = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=200, seed=5, stream=True)
    chunks = list(stream)
    calls = [c for chunk in chunks for d in [chunk.choices[0].delta] if d.tool_calls for c in d.tool_calls]
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""  # a call is not shown as text
    check_calls(calls)


@pytest.mark.parametrize("model", MODELS)
def test_auto_tool_choice_puts_the_tools_in_the_prompt(served, client, model):
    answer = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens == len(reference_ids(served, model, ASK, TOOLS))
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_ollama_client_tools(served):
    ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")
    client = ollama.Client(host=served[0])

    def get_weather(city: str, days: int) -> str:
        """The weather in a city.

        Args:
          city: The city
          days: Days from today
        """
        return "sunny"

    # (the client keeps a schema's types, enums and required fields, not its bounds: enums keep a random
    # model's calls short)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": {
        "type": "object", "required": ["city", "unit"], "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
    # localmix's options (Ollama has neither): a call required, one at most
    required = {"tool_choice": "required", "parallel_tool_calls": False, "seed": 1, "num_predict": 300}
    for model in MODELS:
        answer = client.chat(model, messages=ASK, tools=tools, options=required)
        calls = answer.message.tool_calls
        assert len(calls) == 1 and answer.message.content == ""
        for c in calls:
            assert c.function.name == "get_weather"
            jsonschema.validate(dict(c.function.arguments), tools[0]["function"]["parameters"])
        streamed = [c for chunk in client.chat(model, messages=ASK, tools=tools, stream=True, options=required)
                    for c in chunk.message.tool_calls or []]
        assert streamed and streamed[0].function.name == "get_weather"
        # Ollama's history: calls without ids, results by tool_name
        history = ASK + [{"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]}] + \
            [{"role": "tool", "tool_name": c.function.name, "content": "sunny"} for c in calls]
        after = client.chat(model, messages=history, tools=tools, options={"num_predict": 2})
        assert after.done and after.prompt_eval_count > answer.prompt_eval_count
        # tools from a Python function, as the client turns them into schemas
        plain = client.chat(model, messages=ASK, options={"num_predict": 2})
        offered = client.chat(model, messages=ASK, tools=[get_weather], options={"num_predict": 2})
        assert offered.prompt_eval_count > plain.prompt_eval_count


def deep(levels: int) -> dict:
    value = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def test_tool_requests_the_server_refuses(served, client):
    import requests
    url = served[0]
    for body, param, message in [
            ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
             "tool_choice must be"),
            ({"tool_choice": "required"}, "tool_choice", "needs tools"),
            ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, None, "name must be"),
            ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
             "cannot both"),
            ({"tools": TOOLS, "messages": ASK + [{"role": "assistant", "tool_calls": [
                {"id": "abcDEF123", "function": {"name": "search", "arguments": "{not json"}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "x"}]}, None, "arguments must be"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
              "tool_choice": "required"}, None, "grammar cannot be used"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep(200)}}]}, None,
             "nested more than"),
            ({"tools": TOOLS, "messages": ASK + [{"role": "assistant", "tool_calls": [
                {"id": "abcDEF123", "function": {"name": "search", "arguments": json.dumps(deep(900))}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "x"}]}, None, "nested"),
            ({"parallel_tool_calls": "no"}, None, "parallel_tool_calls must be"),
            ({"functions": [{"name": "f"}]}, "functions", "not supported")]:
        response = requests.post(f"{url}/v1/chat/completions", json={"model": "qwen-tools", "messages": ASK, **body})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert message in error["message"] and (param is None or error["param"] == param), error
