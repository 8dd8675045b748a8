"""`taper serve` through the official `openai` Python package.

Starts the real binary (``TAPER_BIN``, default ``target/debug/taper``) on the
tiny Qwen2 fixture with an API key, on a free loopback port, and checks what
OpenAI's own client sees: models, chat and completions (streamed or not),
logprobs, stop strings, ``n``, seeds, and the exception each error maps to.
Run by ``scripts/test.sh``.
"""

import json
import os
import pathlib
import re
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "qwen2"
NAME = "tiny-qwen2"
KEY = "test-key"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def taper_bin():
    path = os.environ.get("TAPER_BIN") or str(ROOT / "target" / "debug" / "taper")
    if not os.path.isfile(path):
        pytest.fail(f"{path} does not exist: build it with `cargo build` or set TAPER_BIN")
    return path


@pytest.fixture(scope="session")
def server():
    yield from start_server([])


def start_server(extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TAPER_API_KEY", None)
    proc = subprocess.Popen(
        [taper_bin(), "serve", "--model", str(FIXTURE), "--port", "0",
         "--served-model-name", NAME, "--api-key", KEY, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    port = {}
    found = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            m = re.match(r"listening on http://[^ ]*:(\d+)", line)
            if m:
                port["port"] = int(m.group(1))
                found.set()
    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        if not found.wait(60):
            pytest.fail("taper serve did not print `listening on http://HOST:PORT`")
        base = f"http://127.0.0.1:{port['port']}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("/health did not answer 200 within 60 s")
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def reference_text():
    ref = json.loads((FIXTURE / "reference.json").read_text())
    return ref["prompts"][0], ref["greedy_text_0"]


def hello():
    return [{"role": "user", "content": "Hello"}]


def test_models_list_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_chat_non_streamed(client):
    r = client.chat.completions.create(model=NAME, messages=hello(), max_tokens=8, **GREEDY)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_streamed_with_usage_matches_non_streamed(client):
    full = client.chat.completions.create(model=NAME, messages=hello(), max_tokens=8, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=hello(), max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_match_the_transformers_reference(client):
    ids, want = reference_text()
    r = client.completions.create(model=NAME, prompt="The quick b", max_tokens=32, **GREEDY)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=32, **GREEDY)
    assert r.choices[0].text == want
    r = client.completions.create(model=NAME, prompt=["The quick b", "Hi"], max_tokens=32, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == want


def test_completions_streamed(client):
    _, want = reference_text()
    chunks = list(client.completions.create(
        model=NAME, prompt="The quick b", max_tokens=32, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=NAME, messages=hello(), max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token


def test_completion_logprobs_with_echo(client):
    # A prompt no other test sends: the engine still serves a prompt it has
    # seen from its prefix cache, whose tokens then have no logprobs (see
    # the ignored test in tests/server.rs).
    prompt = "Echo me, once"
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=2, **GREEDY)
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])


def test_stop_strings(client):
    _, want = reference_text()
    stop = want[8:11]
    r = client.completions.create(
        model=NAME, prompt="The quick b", max_tokens=32, stop=["\x01never", stop], **GREEDY)
    assert r.choices[0].text == want[: want.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_differ_and_seeds_reproduce(client):
    kwargs = dict(model=NAME, messages=hello(), max_tokens=16, temperature=1.0, seed=42, n=2,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert len(a.choices) == 2
    texts = [c.message.content for c in a.choices]
    assert texts[0] != texts[1]
    assert texts == [c.message.content for c in b.choices]


def test_invalid_parameters_raise_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=hello(), temperature=3)
    assert e.value.status_code == 400
    assert "`temperature` must be in [0, 2]" in e.value.message
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=hello(), max_tokens=600)
    assert e.value.code == "context_length_exceeded"


def test_a_wrong_key_raises_authentication_error(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_an_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=hello())
    assert e.value.code == "model_not_found"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tool_calls_or_content_and_a_round_trip(client):
    # Issue 13: the fixture's template ignores tools (the generic format);
    # its random weights write noise, so the reply is content unless the
    # noise is a well-formed call. Either way the client parses it.
    question = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(
        model=NAME, messages=question, tools=[WEATHER], max_tokens=16, temperature=0,
    )
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason in ("tool_calls", "length")
        call = message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        json.loads(call.function.arguments)
    else:
        assert isinstance(message.content, str)
    # The round trip: the assistant's call and the tool's result go back.
    r = client.chat.completions.create(
        model=NAME,
        max_tokens=4,
        messages=question + [
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        ],
    )
    assert isinstance(r.choices[0].message.content, str)


def test_tool_errors_raise_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=hello(), tools=[WEATHER], max_tokens=1,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert "nope" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=hello(), max_tokens=1,
            prediction={"type": "content", "content": "x"},
        )
    assert "prediction" in str(e.value)


# A short Hermes-format template (`<tool_call>` calls, as Qwen's): the
# fixture's own template ignores tools, and the generic format's system
# prompt with them outgrows its 512 positions.
HERMES = (
    "{%- if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}"
    "- call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def hermes_client(tmp_path_factory):
    template = tmp_path_factory.mktemp("hermes") / "hermes.jinja"
    template.write_text(HERMES)
    gen = start_server(["--chat-template", str(template)])
    base = next(gen)
    yield openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    next(gen, None)


BOUNDED = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


def fold_stream(chunks):
    """Content and calls (name, arguments) of a streamed chat reply."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for c in choice.delta.tool_calls or []:
            if c.function and c.function.name:
                assert c.id and c.index == len(calls)
                calls.append([c.function.name, ""])
            calls[c.index][1] += (c.function.arguments or "") if c.function else ""
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_validate_streamed_and_not(hermes_client, choice):
    # Noise from random weights: a call can only come from the grammar.
    import jsonschema

    schema = BOUNDED["function"]["parameters"]
    args = dict(
        model=NAME, messages=[{"role": "user", "content": "Weather?"}],
        tools=[BOUNDED], tool_choice=choice, parallel_tool_calls=False,
        max_tokens=300, temperature=0,
    )
    r = hermes_client.chat.completions.create(**args)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)
    _, calls, finish = fold_stream(hermes_client.chat.completions.create(stream=True, **args))
    assert finish == "tool_calls"
    assert calls == [["get_weather", call.function.arguments]]


def test_parse_with_a_pydantic_model_returns_the_object(client):
    # `client.chat.completions.parse` sends a strict json_schema made from
    # the model class and parses the reply into it.
    from typing import Literal

    import pydantic

    class Forecast(pydantic.BaseModel):
        city: Literal["Paris", "Oslo"]
        days: int = pydantic.Field(ge=1, le=7)
        rain: bool

    r = client.chat.completions.parse(
        model=NAME, messages=[{"role": "user", "content": "Forecast?"}],
        response_format=Forecast, max_tokens=300, temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast), r.choices[0].message.content
    assert parsed.city in ("Paris", "Oslo") and 1 <= parsed.days <= 7
