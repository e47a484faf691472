"""/v1/chat/completions and /invocations over real HTTP: the chat behaviours of reference §7.2.

Most tests use the tiny random Llama (SmolLM2's real tokenizer and ChatML template, so prompts
and token counts are real; its text is gibberish but deterministic at temperature 0). Two tests
ask the default model, SmolLM2-135M-Instruct, for real answers.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--trust-request-chat-template"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


def sse_events(http: httpx.Client, body: dict, path: str = "/v1/chat/completions") -> list:
    out: list = []
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    assert out[-1] == "[DONE]"
    return out[:-1]


def assert_400(resp: httpx.Response, match: str = "") -> dict:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == 400 and re.search(match, err["message"]), err
    return err


# --- shape, usage, streaming --------------------------------------------------------------------
def test_chat_response_shape_and_usage(client, tokenizer):
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                         temperature=0)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert res.id.startswith("chatcmpl-") and res.object == "chat.completion"
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and choice.message.tool_calls == []
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (n_prompt, 6)
    assert res.usage.total_tokens == n_prompt + 6
    assert res.usage.prompt_tokens_details.cached_tokens >= 0


def test_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert chunks[0].object == "chat.completion.chunk"
    finishes = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].choices[0] is finishes[0]
    assert finishes[0].finish_reason == whole.finish_reason
    assert getattr(finishes[0], "stop_reason", None) == getattr(whole, "stop_reason", None)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content


def test_stop_string_reason_matches(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:3]
    whole = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert whole.finish_reason == "stop" and whole.model_extra["stop_reason"] == stop
    assert stop not in whole.message.content
    last = list(client.chat.completions.create(stop=[stop], stream=True, **kwargs))[-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_stream_usage_and_token_ids(http, tokenizer):
    chunks = sse_events(http, {"messages": MESSAGES, "max_tokens": 4, "temperature": 0,
                               "stream": True, "return_token_ids": True,
                               "stream_options": {"include_usage": True,
                                                  "continuous_usage_stats": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["prompt_token_ids"]
    assert all("usage" in c for c in chunks)
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4
    ids = sum((c["choices"][0].get("token_ids", []) for c in chunks[1:-1]), [])
    assert len(ids) == 4


# --- logprobs -----------------------------------------------------------------------------------
def test_logprobs_combinations(client, http):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None
    res = client.chat.completions.create(logprobs=True, top_logprobs=0, **kwargs)
    content = res.choices[0].logprobs.content
    assert len(content) == 3 and all(e.top_logprobs == [] for e in content)
    res = client.chat.completions.create(logprobs=True, top_logprobs=5, **kwargs)
    for entry in res.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 5 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    assert_400(chat(http, top_logprobs=2), "`logprobs` must be set to true")
    assert_400(chat(http, logprobs=True, top_logprobs=21), "max allowed")
    chunks = list(client.chat.completions.create(logprobs=True, top_logprobs=2, stream=True,
                                                 **kwargs))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == 3 and all(len(e.top_logprobs) == 2 for e in streamed)


def test_prompt_logprobs_in_chat(http):
    body = chat(http, max_tokens=2, prompt_logprobs=1).json()
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) > 5
    assert chat(http, max_tokens=2).json()["prompt_logprobs"] is None
    assert_400(chat(http, max_tokens=2, prompt_logprobs=1, stream=True), "stream")


# --- structured outputs -------------------------------------------------------------------------
def test_structured_outputs(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
    res = client.chat.completions.create(
        extra_body={"structured_outputs": {"choice": ["red", "green"]}}, **kwargs)
    assert res.choices[0].message.content in ("red", "green")
    res = client.chat.completions.create(
        extra_body={"structured_outputs": {"regex": "#[0-9a-f]{6}"}}, **kwargs)
    assert re.fullmatch("#[0-9a-f]{6}", res.choices[0].message.content)
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    res = client.chat.completions.create(
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        **kwargs)
    assert 0 <= json.loads(res.choices[0].message.content)["n"] <= 9


def test_response_format_variants(http):
    body = {"max_tokens": 60, "temperature": 0}
    text = chat(http, response_format={"type": "text"}, max_tokens=3).json()
    assert text["choices"][0]["message"]["content"]
    obj = chat(http, response_format={"type": "json_object"}, **body).json()["choices"][0]
    if obj["finish_reason"] == "stop":  # a random model may spend the budget on whitespace
        json.loads(obj["message"]["content"])
    else:
        assert obj["message"]["content"].lstrip().startswith("{")
    assert_400(chat(http, response_format={"type": "json_schema"}), "json_schema")
    assert_400(chat(http, response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
    assert_400(chat(http, response_format={"type": "bogus"}))
    assert_400(chat(http, structured_outputs={"json": {"type": "nonsense"}}))
    assert_400(chat(http, structured_outputs={"choice": "not-a-list"}))
    unenforced = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}
    err = assert_400(chat(http, response_format={"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": unenforced}}),
                     "'not' at #/properties/a is not supported")
    assert err["param"] == "structured_outputs"


# --- request shapes -----------------------------------------------------------------------------
def test_list_content_custom_role_unknown_fields_big_seed(http):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": "there"}]},
                {"role": "my-custom-role", "content": "ok"}]
    resp = http.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 3, "seed": 2**63 - 1, "some_new_field": {"a": 1},
        "guided_choice": ["x"], "return_prompt_text": True})
    assert resp.status_code == 200, resp.text
    assert "<|im_start|>user\nHello\nthere<|im_end|>" in resp.json()["prompt_text"]
    assert "<|im_start|>my-custom-role\nok" in resp.json()["prompt_text"]
    resp = chat(http, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert_400(resp, "not supported")


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=3, seed=42)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    texts: dict[int, str] = {}
    roles, finishes = set(), {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        c = chunk.choices[0]
        if c.delta.role:
            roles.add(c.index)
        texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        finishes[c.index] = finishes.get(c.index, 0) + (c.finish_reason is not None)
    assert roles == {0, 1, 2} and finishes == {0: 1, 1: 1, 2: 1}
    assert [texts[i] for i in range(3)] == [c.message.content for c in a.choices]
    one = client.chat.completions.create(**{**kwargs, "n": 1})
    assert len(one.choices) == 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**kwargs, "n": 129})


def test_continue_final_message_with_echo(http):
    prefill = "Once upon a time"
    messages = [{"role": "user", "content": "Tell a story."},
                {"role": "assistant", "content": prefill}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "echo": True, "max_tokens": 4, "temperature": 0, "return_prompt_text": True}
    res = http.post("/v1/chat/completions", json=body).json()
    assert res["prompt_text"].endswith("<|im_start|>assistant\n" + prefill)
    msg = res["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].startswith(prefill)
    assert len(msg["content"]) > len(prefill)
    chunks = sse_events(http, {**body, "stream": True, "return_prompt_text": False})
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.startswith(prefill)
    assert_400(http.post("/v1/chat/completions", json={**body, "add_generation_prompt": True}),
               "continue_final_message")


def test_invalid_logit_bias_and_bounds(http, tokenizer):
    assert_400(chat(http, logit_bias={str(len(tokenizer) + 1): 1}), "out of vocabulary")
    assert_400(chat(http, logit_bias={"x": 1}))
    assert_400(chat(http, max_tokens=600), "maximum context length is 512 tokens")
    assert_400(chat(http, temperature=-1))
    assert_400(chat(http, messages=[]))
    assert_400(chat(http, messages=[{"content": "no role"}]))


def test_logit_bias_steers_generation(client, tokenizer):
    target = tokenizer.encode(" banana", add_special_tokens=False)[0]
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                         temperature=0, logit_bias={str(target): 100})
    assert res.choices[0].message.content == " banana" * 3


def test_max_tokens_omitted_fills_the_context(client):
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length"
    assert res.usage.total_tokens == 512  # --max-model-len in the test server


# --- templates ----------------------------------------------------------------------------------
def test_request_template_and_kwargs(http):
    template = ("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
                "{{ greeting }}{{ reasoning_effort }}{% if add_generation_prompt %}>{% endif %}")
    res = chat(http, chat_template=template, chat_template_kwargs={"greeting": "hey"},
               reasoning_effort="low", return_prompt_text=True, max_tokens=2)
    assert res.status_code == 200, res.text
    assert res.json()["prompt_text"] == "[system:You are terse.][user:Name three colours.]heylow>"


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}",
                                      "{{ messages.__class__.__init__.__globals__['os'] }}",
                                      "{{ raise_exception('nope') }}", "{% for %}"])
def test_hostile_or_broken_templates_are_400(http, server, template):
    assert_400(chat(http, chat_template=template))
    assert http.get("/health").status_code == 200


# --- /invocations, disconnects ------------------------------------------------------------------
def test_invocations_equals_chat(http):
    body = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    direct = http.post("/v1/chat/completions", json=body).json()
    via = http.post("/invocations", json=body).json()
    assert via.keys() == direct.keys()
    assert [c["message"] for c in via["choices"]] == [c["message"] for c in direct["choices"]]
    chunks = sse_events(http, {**body, "stream": True}, path="/invocations")
    assert chunks[0]["object"] == "chat.completion.chunk"


def _aborted(http: httpx.Client) -> float:
    return sum(float(v) for v in re.findall(
        r'^\w+:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$',
        http.get("/metrics").text, re.M))


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts(http, server, stream):
    before = _aborted(http)
    body = {"messages": MESSAGES, "max_tokens": 450, "ignore_eos": True, "stream": stream, "n": 4}
    if stream:
        with httpx.Client(base_url=server.base_url, timeout=60) as other:
            with other.stream("POST", "/v1/chat/completions", json=body) as resp:
                next(resp.iter_lines())
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url_for("v1/chat/completions"), json=body, timeout=0.3)
    deadline = time.monotonic() + 30
    while _aborted(http) < before + 1:
        assert time.monotonic() < deadline, "the request was not aborted after the client left"
        time.sleep(0.2)
    assert chat(http, max_tokens=2).status_code == 200


# --- a real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(launch_server, smollm2_gguf):
    # 30 layers: the base 16 MiB pool is too small for --max-model-len 512.
    with launch_server(["--kv-cache-memory", "64MiB"], model=str(smollm2_gguf)) as s:
        yield s


def test_smollm2_answers(smollm2):
    client = smollm2.client()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                         temperature=0)
    answer = res.choices[0].message.content
    assert "paris" in answer.lower(), answer
    assert res.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert streamed == answer
    res = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert res.choices[0].message.content in ("yes", "no")  # 135M parameters: only the form
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    res = client.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0, messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert "paris" in json.loads(res.choices[0].message.content)["city"].lower()


def test_tokenize_renders_tools_as_the_chat_route_does(http):
    """Tool definitions go through the same model on both routes: null fields, unknown keys and
    a missing "type" render alike, so /tokenize counts what a chat request will use."""
    template = "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ messages[0].content }}"
    tools = [{"type": "function", "function": {"name": "f", "description": None, "extra": 1,
                                               "parameters": {"type": "object"}}},
             {"function": {"name": "g"}}]
    messages = [{"role": "user", "content": "hi"}]
    counted = http.post("/tokenize", json={"messages": messages, "tools": tools,
                                           "chat_template": template}).json()["count"]
    resp = chat(http, messages=messages, tools=tools, tool_choice="none", chat_template=template,
                max_tokens=1)
    assert resp.status_code == 200, resp.text
    used = resp.json()["usage"]["prompt_tokens"]
    assert counted == used
