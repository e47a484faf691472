"""/v1/completions over real HTTP (tiny random Llama, real engine): the behaviours of reference
§7.2 that vLLM's own completion tests check, through the official openai client and raw httpx.

The model's text is gibberish but deterministic at temperature 0, which is all these need.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server() as s:
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


def sse_events(http: httpx.Client, path: str, body: dict) -> list[dict | str]:
    """The decoded `data:` payloads of a stream, `[DONE]` kept as a string."""
    out: list[dict | str] = []
    with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return out


def assert_400(http: httpx.Client, body: dict, match: str = "", path: str = "/v1/completions"):
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == 400 and re.search(match, err["message"]), err
    return err


# --- usage, logprobs ----------------------------------------------------------------------------
def test_usage_is_exact(client, tokenizer):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    prompt_tokens = len(tokenizer.encode(PROMPT))
    choice = res.choices[0]
    assert res.id.startswith("cmpl-") and res.object == "text_completion" and res.model == MODEL
    assert choice.finish_reason == "length" and len(choice.text) > 0
    assert res.usage.completion_tokens == 5 and res.usage.prompt_tokens == prompt_tokens
    assert res.usage.total_tokens == prompt_tokens + 5
    # Prefix caching is on by default: cached_tokens is always reported.
    assert res.usage.prompt_tokens_details.cached_tokens >= 0


def test_logprobs_shapes(client):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert res.choices[0].logprobs is None
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=0)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) == 1 for top in lp.top_logprobs)
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=5)
    lp = res.choices[0].logprobs
    assert all(5 <= len(top) <= 6 for top in lp.top_logprobs)
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == res.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_too_many_logprobs_is_400_and_server_lives(client, stream):
    for n in (21, 30):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=n,
                                      stream=stream)
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=20)
    assert len(res.choices[0].logprobs.tokens) == 2


@pytest.mark.parametrize("prompt_logprobs", [0, 1, None])
def test_prompt_logprobs(client, tokenizer, prompt_logprobs):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                    extra_body={"prompt_logprobs": prompt_logprobs})
    got = res.choices[0].prompt_logprobs
    if prompt_logprobs is None:
        assert got is None
        return
    ids = tokenizer.encode(PROMPT)
    assert len(got) == len(ids) and got[0] is None
    for tid, pos in zip(ids[1:], got[1:]):
        assert str(tid) in pos and len(pos) <= prompt_logprobs + 1
        assert {"logprob", "rank", "decoded_token"} <= set(pos[str(tid)])


def test_prompt_logprobs_refusals(http):
    assert_400(http, {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "stream")
    # -1 (the whole vocabulary) exceeds the default --max-logprobs 20
    assert_400(http, {"prompt": PROMPT, "prompt_logprobs": -1}, "max allowed: 20")


# --- streaming ----------------------------------------------------------------------------------
def test_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_n_and_batch_indices(client, stream):
    prompts = [PROMPT, "Hello", "One more"]
    res = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3,
                                    temperature=0.8, seed=7, stream=stream)
    if not stream:
        assert [c.index for c in res.choices] == list(range(6))
        assert all(c.finish_reason == "length" for c in res.choices)
        return
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for chunk in res:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finishes[c.index] = finishes.get(c.index, 0) + (c.finish_reason is not None)
    assert sorted(texts) == list(range(6)) and all(v == 1 for v in finishes.values())


def test_batch_prompts_match_single_prompts(client):
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello world"], max_tokens=4,
                                      temperature=0)
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
              for p in (PROMPT, "Hello world")]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in single]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert batch.usage.completion_tokens == 8


def test_token_id_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=4,
                                       temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and len(by_ids.choices) == 2


@pytest.mark.parametrize("include_usage", [None, False, True])
@pytest.mark.parametrize("continuous", [None, False, True])
def test_stream_options_matrix(http, include_usage, continuous):
    options = {k: v for k, v in (("include_usage", include_usage),
                                 ("continuous_usage_stats", continuous)) if v is not None}
    events = sse_events(http, "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
                         "stream_options": options})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        u = last["usage"]
        assert u["completion_tokens"] == 5
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c or c["usage"] is None for c in chunks)
    if include_usage and continuous:
        assert all(c.get("usage") for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 5
    else:
        assert all(not c.get("usage") for c in chunks)


def test_stream_options_without_stream_is_400(http):
    assert_400(http, {"prompt": PROMPT, "stream_options": {"include_usage": True}},
               "stream=True")


# --- echo, token ids ----------------------------------------------------------------------------
def test_echo_with_logprobs_covers_the_prompt(client, tokenizer):
    n_prompt = len(tokenizer.encode(PROMPT))
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    echo=True, logprobs=1)
    choice = res.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    only = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0


def test_echo_streaming(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == whole and whole.startswith(PROMPT)


def test_return_token_ids(http, tokenizer):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert len(choice["token_ids"]) == 5
    assert tokenizer.decode(choice["token_ids"]) == choice["text"]
    events = sse_events(http, "/v1/completions", {**body, "stream": True})
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]


# --- structured outputs -------------------------------------------------------------------------
def test_structured_choice_regex_json(client):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert res.choices[0].text in ("yes", "no")
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1,
                                    seed=3, extra_body={"structured_outputs":
                                                        {"regex": "[a-c]{3}-[0-9]{2}"}})
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", res.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    # Compact JSON: a random model would otherwise fill max_tokens with allowed whitespace.
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                    extra_body={"structured_outputs": {
                                        "json": schema, "disable_any_whitespace": True}})
    assert isinstance(json.loads(res.choices[0].text)["ok"], bool)


@pytest.mark.parametrize("spec", [
    {"regex": "(unclosed"}, {"json": {"type": "nonsense"}}, {"json": "{not json"},
    {"grammar": ""}, {"grammar": "root ::= undefined_rule"}, {"choice": []},
    {"regex": "a", "choice": ["a"]}, {},
])
def test_invalid_structured_outputs_are_400(http, spec):
    assert_400(http, {"prompt": PROMPT, "max_tokens": 5, "structured_outputs": spec})


def test_structured_wrong_type_is_400(http):
    assert_400(http, {"prompt": PROMPT, "structured_outputs": {"choice": "yes"}})


# --- validation ---------------------------------------------------------------------------------
def test_unknown_fields_and_large_seed_accepted(http):
    body = {"prompt": PROMPT, "max_tokens": 2, "seed": 2**63 - 1, "guided_json": {"x": 1},
            "best_of": 3, "some_future_field": [1, 2]}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1234, n=2)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_prompt_validation_messages(http, tokenizer):
    assert_400(http, {"prompt": ""},
               "Either prompt or prompt_embeds must be provided and non-empty.")
    assert_400(http, {"prompt": []}, "Either prompt or prompt_embeds")
    oov = len(tokenizer) + 5
    assert_400(http, {"prompt": [oov]}, f"Token id {oov} is out of vocabulary")
    err = assert_400(http, {"prompt": PROMPT, "max_tokens": 600},
                     "This model's maximum context length is 512 tokens. However, you requested "
                     "600 output tokens")
    assert err["param"] == "input_tokens"
    # A text too long for any tokenization to fit is refused before it is tokenized...
    err = assert_400(http, {"prompt": "ab " * 20000}, "your prompt contains 60000 input characters")
    assert err["param"] == "input_text"
    # ... unless truncation was asked for
    ok = http.post("/v1/completions", json={"prompt": "ab " * 20000, "truncate_prompt_tokens": 8,
                                            "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 8


@pytest.mark.parametrize("body", [
    {"logit_bias": {"99999999": 5}}, {"logit_bias": {"not-an-id": 5}}, {"n": 129}, {"n": 0},
    {"temperature": 2.5}, {"top_p": 0}, {"top_k": -5}, {"min_p": 2}, {"presence_penalty": 9},
    {"repetition_penalty": 0}, {"stop": [""]}, {"stop": ["x"] * 100}, {"seed": 2**64},
    {"min_tokens": 50, "max_tokens": 5}, {"max_tokens": -1}, {"stop_token_ids": [10**9]},
    {"allowed_token_ids": [10**9]}, {"truncate_prompt_tokens": 10**6}, {"cache_salt": ""},
    {"temperature": "hot"}, {"use_beam_search": True},
])
def test_bounds_are_400(http, body):
    assert_400(http, {"prompt": PROMPT, "max_tokens": 4, **body})


def test_untrusted_request_template_refused(http):
    assert_400(http, {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"},
               "trust-request-chat-template", path="/v1/chat/completions")


def test_auto_tool_choice_needs_server_flags(http):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for choice in ("auto", None):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
        if choice:
            body["tool_choice"] = choice
        assert_400(http, body, '"auto" tool choice requires --enable-auto-tool-choice and '
                   "--tool-call-parser to be set", path="/v1/chat/completions")
    assert_400(http, {"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                      "tool_choice": "required"},
               'tool_choice="required" requires --tool-call-parser to be set',
               path="/v1/chat/completions")


def test_invocations_dispatches_completions(http):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    direct = http.post("/v1/completions", json=body).json()
    via = http.post("/invocations", json=body).json()
    assert via["object"] == "text_completion"
    assert [c["text"] for c in via["choices"]] == [c["text"] for c in direct["choices"]]
    resp = http.post("/invocations", json={"input": "embed me"})
    assert resp.status_code == 400
    assert "Cannot find suitable handler" in resp.json()["error"]["message"]
    resp = http.post("/invocations", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON decode error" in resp.json()["error"]["message"]


def test_stream_disconnect_aborts(http, server):
    def aborted() -> float:
        text = http.get("/metrics").text
        return sum(float(v) for v in re.findall(
            r'^\w+:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M))

    before = aborted()
    with httpx.Client(base_url=server.base_url, timeout=60) as other:
        with other.stream("POST", "/v1/completions",
                          json={"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
                                "stream": True}) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())
    deadline = time.monotonic() + 30
    while aborted() < before + 1:
        assert time.monotonic() < deadline, "the stream's request was not aborted"
        time.sleep(0.2)
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_forced_usage_and_prompt_tokens_details_flags(launch_server, http):
    """--enable-force-include-usage: a stream without stream_options still reports usage on every
    chunk and in a final usage chunk. --enable-prompt-tokens-details reports cached tokens with
    prefix caching off; without either flag a stream sends no usage."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "stream": True}

    def chunks(client: httpx.Client) -> list[dict]:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            return [json.loads(line[6:]) for line in resp.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"]

    assert all(c.get("usage") is None for c in chunks(http))  # the default server
    with launch_server(["--enable-force-include-usage", "--no-enable-prefix-caching",
                        "--enable-prompt-tokens-details"]) as server:
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            streamed = chunks(c)
            assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] == 3
            assert all(ch["usage"] is not None for ch in streamed)  # continuous usage too
            usage = c.post("/v1/completions", json={**body, "stream": False}).json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
            assert streamed[-1]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
