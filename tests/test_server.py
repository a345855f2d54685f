"""`localmix serve`: the OpenAI routes through the official client, the Ollama ones as plain HTTP."""

import asyncio
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
uvicorn = pytest.importorskip("uvicorn")

import localmix  # noqa: E402
from localmix.quant.convert import LocalSource, convert  # noqa: E402
from localmix.server import create_app  # noqa: E402
from localmix.store import model_summary, verify  # noqa: E402

from conftest import make_hf_model, running  # noqa: E402

GREEDY = dict(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, intermediate_size=128)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / "tiny-q4", bits="4")


@pytest.fixture(scope="module")
def server(q4):
    model = localmix.load(q4)
    app = create_app(model, "tiny")
    model.server_engine = app.state.server.catalog.fixed.engine
    with running(app) as url:
        yield url, model


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def post(url, body, raw: bytes | None = None):
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(server[0] + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_chat_completion_is_the_api_answer(server, client):
    model = server[1]
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = model.chat(messages, max_tokens=8, **GREEDY)
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_with_seed_and_stop(server, client):
    model = server[1]
    expected = model.generate("Once upon a time", max_tokens=10, temperature=0.9, seed=5, top_p=1.0, top_k=0,
                              repeat_penalty=1.0)
    answer = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0.9,
                                       seed=5)
    assert answer.choices[0].text == expected
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0.9,
                                    seed=5, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_ollama_routes(server):
    url, model = server
    status, text = post(url + "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                            "options": {"temperature": 0, "num_predict": 6, "repeat_penalty": 1}})
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and lines[-1]["done"] and not any(line["done"] for line in lines[:-1])
    assert "".join(line["message"]["content"] for line in lines) == model.chat("Hi", max_tokens=6, **GREEDY)
    assert lines[-1]["eval_count"] == 6 and lines[-1]["total_duration"] > 0 and lines[-1]["done_reason"] == "length"
    status, text = post(url + "/api/generate", {"model": "tiny:latest", "prompt": "Once upon", "stream": False,
                                                "options": {"temperature": 0, "num_predict": 5, "repeat_penalty": 1}})
    reply = json.loads(text)
    assert status == 200 and reply["done"] and reply["response"] == model.generate("Once upon", max_tokens=5, **GREEDY)
    with urllib.request.urlopen(url + "/api/tags") as response:
        assert [m["name"] for m in json.loads(response.read())["models"]] == ["tiny"]


def test_bad_requests_are_openai_errors(server, client):
    url, model = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
    long = "word " * (model.config.max_position_embeddings + 10)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=long, max_tokens=4)
    status, text = post(url + "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, text = post(url + "/api/chat", {"model": "tiny", "messages": "Hi"})
    assert status == 400 and "messages" in json.loads(text)["error"]  # Ollama's {"error": "..."} on /api
    assert post(url + "/v1/nothing", {})[0] == 404
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="has no tools") as no_tools:  # Mixtral 8x7B's v1 format
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=[tool])
    assert no_tools.value.body["param"] == "tools"
    assert client.models.list().data  # and the server is still there


def test_a_client_that_leaves_stops_its_answer(server, client):
    url, model = server
    # As long as the context allows (a larger max_tokens is a 400 now: prompt + max_tokens must fit).
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=model.config.max_position_embeddings - 20, temperature=0.8,
                                            stream=True)
    next(iter(stream))
    engine = model.server_engine
    stream.close()
    decoded = engine.decoded
    for _ in range(200):  # the engine drops the answer at its next step
        if not engine.active and not engine.waiting:
            break
        time.sleep(0.05)
    assert not engine.active and not engine.waiting
    assert engine.decoded - decoded < 50  # not the ~490 tokens it was asked for
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


def test_load_forty_requests_four_at_a_time(server, client):
    model = server[1]
    prompts = [f"Tell me about the number {i}" for i in range(40)]

    def ask(prompt):
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=6, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    expected = [model.chat(p, max_tokens=6, **GREEDY) for p in prompts]
    assert len(answers) == 40 and all(isinstance(a, str) for a in answers)
    same = sum(a == e for a, e in zip(answers, expected))
    print(f"{same}/40 answers equal to the API's; up to {model.server_engine.widest} decoded together")
    assert same == 40 and model.server_engine.widest >= 2  # concurrent answers were batched


ROUTINGS = [dict(experts_per_token=1), dict(min_expert_weight=0.4), dict(experts_per_token=3), {}]


def test_requests_choose_their_routing(server, client):
    """localmix's routing fields, beside OpenAI's (the client's extra_body) or in Ollama's options:
    each answer is Model.stream's with the same settings, also while answers with other settings
    are decoded at the same time; bad values are a 400 naming the field."""
    url, model = server
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = [model.chat(messages, max_tokens=8, **GREEDY, **routing) for routing in ROUTINGS]
    assert len(set(expected)) > 1  # the settings change the answer: a request given another's would show

    def ask(routing):
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                extra_body=routing)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, ROUTINGS * 3)) == expected * 3
    status, text = post(url + "/api/chat", {"model": "tiny", "messages": messages, "stream": False,
                                            "options": {"temperature": 0, "num_predict": 8, "repeat_penalty": 1,
                                                        **ROUTINGS[0]}})
    assert status == 200 and json.loads(text)["message"]["content"] == expected[0]
    assert model.config.num_experts_per_tok == 2 and model.chat(messages, max_tokens=8, **GREEDY) == expected[-1]

    for field, value in [("experts_per_token", 5), ("experts_per_token", 0), ("experts_per_token", "2"),
                         ("min_expert_weight", 1), ("min_expert_weight", -0.1), ("fallback_margin", 1.5)]:
        status, text = post(url + "/api/generate", {"model": "tiny", "prompt": "Hi", "options": {field: value}})
        assert status == 400 and field in json.loads(text)["error"], (field, value, text)
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={field: value})


def test_one_engine_step_decodes_each_routing_apart(q4, monkeypatch):
    """Answers with different routing active in the engine together: one model call per routing in
    each step (a call routes all its rows alike), those with equal routing in the same call, and
    each answer is Model.stream's with its settings."""
    from localmix.sampling import SamplingParams
    from localmix.server import Engine, Job

    model = localmix.load(q4)
    engine = Engine(model)
    engine.stop()  # driven by hand below, not by its thread
    engine.thread.join(10)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = [model.chat(messages, max_tokens=8, **GREEDY, **routing) for routing in ROUTINGS]
    calls = []
    step = model.transformer.step
    monkeypatch.setattr(model.transformer, "step", lambda ids, caches, options=None:
                        calls.append((len(ids), options)) or step(ids, caches, options))
    loop = asyncio.new_event_loop()
    ids, _ = model.encode_prompt(messages)
    jobs = [Job(ids, 8, SamplingParams(**GREEDY), model.routing_options(**routing), True, loop, asyncio.Queue())
            for routing in ROUTINGS * 2]
    for job in jobs:
        engine.start(job)
    engine.step()
    assert len(calls) == 4 and set(calls) == {(2, model.routing_options(**routing)) for routing in ROUTINGS}
    while engine.active:
        engine.step()
    loop.run_until_complete(asyncio.sleep(0))  # the responses the engine sent
    answers = []
    for job in jobs:
        responses = [job.queue.get_nowait() for _ in range(job.queue.qsize())]
        answers.append("".join(r.text for r in responses))
    loop.close()
    assert answers == expected * 2


def test_a_stopped_catalog_ends_its_engines_after_the_step_under_way(q4):
    """`serve` stopped with an answer under way (a second Ctrl-C skips the app's shutdown): the
    engine's thread ends after its step, not after the answer, and the stop says so; the process
    must not exit while a thread is inside a kernel (the C++ runtimes abort)."""
    from localmix.catalog import Catalog
    from localmix.sampling import SamplingParams
    from localmix.server import Job, served_model

    model = localmix.load(q4)
    catalog = Catalog(fixed=served_model(model, "tiny"))
    engine = catalog.fixed.engine
    loop = asyncio.new_event_loop()
    ids, _ = model.encode_prompt([{"role": "user", "content": "Tell me a long story."}])
    engine.submit(Job(ids, 400, SamplingParams(**GREEDY), model.routing_options(), True, loop, asyncio.Queue()))
    deadline = time.monotonic() + 60
    while engine.decoded < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert catalog.stop(wait=30)
    assert not engine.thread.is_alive() and engine.decoded < 400
    loop.close()


# --- Ollama's routes through its official client ---------------------------------------------------

ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")


def test_ollama_client_methods(server, tmp_path, monkeypatch):
    url, model = server
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    client = ollama.Client(host=url)
    assert [m.model for m in client.list().models] == ["tiny"]
    shown = client.show("tiny")
    assert shown.details.family == "mixtral" and shown.modelinfo["general.architecture"] == "mixtral"
    assert shown.modelinfo["general.parameter_count"] == model_summary(model.path)["parameters"]
    running = client.ps().models
    assert [m.model for m in running] == ["tiny"] and running[0].size > 0
    answer = client.generate("tiny", "Once upon a time", options={"num_predict": 4, "temperature": 0})
    assert answer.done and answer.eval_count == 4
    chat = client.chat("tiny", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3})
    assert chat.message.role == "assistant" and chat.eval_count == 3
    client.copy("tiny", "tiny-copy")
    copied = tmp_path / "home" / "models" / "tiny-copy"
    assert verify(copied) == []
    with pytest.raises(ollama.ResponseError) as refused:
        client.delete("tiny")
    assert refused.value.status_code == 400 and "the model this server runs" in refused.value.error
    for call in (lambda: client.show("other"), lambda: client.copy("other", "x")):
        with pytest.raises(ollama.ResponseError) as missing:
            call()
        assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as taken:
        client.copy("tiny", "tiny-copy")
    assert taken.value.status_code == 400 and "exists already" in taken.value.error
    with pytest.raises(ollama.ResponseError) as unsupported:
        client.embed("tiny", "hello")
    assert unsupported.value.status_code == 501 and "embeddings are not supported" in unsupported.value.error


def test_server_root_version_and_one_model(server, client):
    url, _ = server
    for method in ("GET", "HEAD"):
        with urllib.request.urlopen(urllib.request.Request(url + "/", method=method)) as response:
            assert response.status == 200 and response.read() == (b"localmix is running" if method == "GET" else b"")
    with urllib.request.urlopen(url + "/api/version") as response:
        assert json.loads(response.read())["version"] == localmix.__version__
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.APIStatusError) as unsupported:
        client.embeddings.create(model="tiny", input="hello")
    assert unsupported.value.status_code == 501


def test_n_answers_and_logprobs(server, client):
    """n answers decoded together, each its own (seed + index); logprobs are the model's own
    log-softmax (before temperature), with the likeliest tokens sorted."""
    url, model = server
    messages = [{"role": "user", "content": "Tell me a story."}]
    several = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, seed=11,
                                             temperature=1.5)
    texts = [c.message.content for c in several.choices]
    assert [c.index for c in several.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert several.usage.completion_tokens == 18
    alone = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=11, temperature=1.5)
    assert alone.choices[0].message.content == texts[0]

    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 4
    ids, _ = model.encode_prompt(messages)
    logits = model.logits(ids)[-1].astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    assert abs(first.logprob - expected.max()) < 1e-3  # greedy: the likeliest token
    assert [t.logprob for t in first.top_logprobs] == sorted(t.logprob for t in first.top_logprobs)[::-1]
    np.testing.assert_allclose([t.logprob for t in first.top_logprobs], np.sort(expected)[::-1][:3], atol=1e-3)
    assert first.token == first.top_logprobs[0].token and bytes(first.bytes).decode("utf-8", "replace") == first.token

    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, logprobs=2,
                                           temperature=0)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=2, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}

    # Ollama's logprobs, through its client: the same numbers, whole or a line per token
    import ollama
    greedy = {"num_predict": 4, "temperature": 0, "repeat_penalty": 1.0}
    whole = ollama.Client(host=url).chat("tiny", messages, logprobs=True, top_logprobs=3, options=greedy)
    assert [t.token for t in whole.logprobs] == [t.token for t in content]
    np.testing.assert_allclose([t.logprob for t in whole.logprobs], [t.logprob for t in content], atol=1e-5)
    assert [t.token for t in whole.logprobs[0].top_logprobs] == [t.token for t in first.top_logprobs]
    lines = list(ollama.Client(host=url).generate("tiny", "Once upon a time", logprobs=True, options=greedy,
                                                  stream=True))
    assert [len(line.logprobs or []) for line in lines] == [1, 1, 1, 1]


def test_an_api_key_is_required_when_set_and_every_request_is_logged(q4, caplog):
    """With --api-key: 401 without it (but `/`), answers with it; one log line per request."""
    from starlette.testclient import TestClient
    app = create_app(localmix.load(q4), "tiny", api_key="s3cret")
    with TestClient(app) as http, caplog.at_level("INFO", logger="localmix.server"):
        assert http.get("/").status_code == 200
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        assert http.get("/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "tiny"
    lines = [r.getMessage() for r in caplog.records if r.name == "localmix.server"]
    assert len(lines) == 4 and lines[1].startswith("401 |") and lines[1].endswith('GET    "/v1/models"')


def test_serve_beyond_loopback_needs_an_api_key(q4):
    from test_cli import assert_one_line_error, localmix_cli
    assert_one_line_error(localmix_cli("serve", q4, "--host", "0.0.0.0", "--port", 1), "give an --api-key")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000}, "admin": {"type": "boolean"}},
        "required": ["id", "admin"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
]


def test_json_schemas_are_followed_by_a_model_that_knows_no_json(server, client):
    """Structured output: the random model's answers to five schemas, through both clients, all
    parse and conform (jsonschema checks them); json_object / format "json" give a JSON object."""
    jsonschema = pytest.importorskip("jsonschema")
    url, _ = server
    ask = [{"role": "user", "content": "Answer in JSON."}]
    for i, schema in enumerate(SCHEMAS):
        answer = client.chat.completions.create(
            model="tiny", messages=ask, max_tokens=200, seed=i, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
        reply = ollama.Client(host=url).chat("tiny", messages=ask, format=schema, options={"seed": i, "num_predict": 200})
        jsonschema.validate(json.loads(reply.message.content), schema)
    loose = client.chat.completions.create(model="tiny", messages=ask, max_tokens=300, seed=1, temperature=0.5,
                                           response_format={"type": "json_object"})
    text = loose.choices[0].message.content
    assert text.startswith("{") and (loose.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=ask, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert "schema" in str(bad.value)


def test_localmix_ps_asks_the_server(server):
    from test_cli import assert_one_line_error, localmix_cli
    url, _ = server
    result = localmix_cli("ps", "--url", url)
    assert result.returncode == 0 and "tiny" in result.stdout and "the server stops" in result.stdout
    assert_one_line_error(localmix_cli("ps", "--url", "http://127.0.0.1:9"), "no localmix server answers")


@pytest.fixture
def on_demand(q4, tmp_path, monkeypatch):
    """A server over a home of two models, each loaded when a request names it (one at a time)."""
    import shutil
    from localmix.catalog import Catalog
    from localmix.server import served_model
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(q4, models / name)
    opened = []

    def open_model(name):
        opened.append(name)
        return served_model(localmix.load(models / name), name)
    app = create_app(catalog=Catalog(open=open_model, max_loaded=1, keep_alive=300.0))
    with running(app) as url:
        yield url, opened, models


def test_models_on_demand(on_demand):
    """`localmix serve` without a model: every model of the home is listed; a request loads the one it
    names (unloading the other: one at a time), show describes a model without loading it, keep_alive
    0 unloads once answered, delete unloads and removes; no model or an unknown one is an error."""
    url, opened, models = on_demand
    client = ollama.Client(host=url)
    assert sorted(m.model for m in client.list().models) == ["tiny-a", "tiny-b"]
    oa = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert sorted(m.id for m in oa.models.list()) == ["tiny-a", "tiny-b"] and client.ps().models == []
    assert client.show("tiny-b").details.family == "mixtral" and opened == []
    client.generate("tiny-a", "Once upon a time", options={"num_predict": 3})
    assert [m.model for m in client.ps().models] == ["tiny-a"]
    oa.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert [m.model for m in client.ps().models] == ["tiny-b"] and opened == ["tiny-a", "tiny-b"]
    client.generate("tiny-a", "Hello", options={"num_predict": 2}, keep_alive=0)
    for _ in range(50):  # unloaded within a few expiry checks
        if not client.ps().models:
            break
        time.sleep(0.1)
    assert client.ps().models == []
    client.chat("tiny-b", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}, keep_alive="1h")
    assert [m.model for m in client.ps().models] == ["tiny-b"]
    client.delete("tiny-b")  # loaded and idle: unloaded, then removed
    assert client.ps().models == [] and not (models / "tiny-b").exists()
    assert [m.model for m in client.list().models] == ["tiny-a"]
    status, answer = post(url + "/api/generate", {"prompt": "Hi"})
    assert status == 400 and "model is required" in answer
    status, answer = post(url + "/api/generate", {"model": "tiny-b", "prompt": "Hi"})
    assert status == 404 and "not found" in answer
    status, answer = post(url + "/api/generate", {"model": "tiny-a", "prompt": "Hi", "keep_alive": "soon"})
    assert status == 400 and "keep_alive" in answer
    loaded = client.generate("tiny-a")  # no prompt: load it ahead, as Ollama's clients do
    assert loaded.done and loaded.done_reason == "load" and [m.model for m in client.ps().models] == ["tiny-a"]
    assert client.chat("tiny-a", messages=[], keep_alive=0).done_reason == "unload"
    for _ in range(50):
        if not client.ps().models:
            break
        time.sleep(0.1)
    assert client.ps().models == []
    with pytest.raises(ollama.ResponseError) as unsupported:
        client.create("mine", from_="tiny-a")
    assert unsupported.value.status_code == 501 and "localmix pull" in unsupported.value.error
