"""Tool calling and reasoning over real HTTP (reference §3.2, §3.3, §7.2 items 20–21).

The server runs the tiny random Llama with `--reasoning-parser deepseek_r1 --enable-auto-tool-choice
--tool-call-parser hermes`. A random model never writes a tool call by itself, so the tests make
it write one for real: `required` and named tool choice constrain generation with a JSON schema
(that is how they work), and the auto-tool and reasoning tests force the exact text through a
`structured_outputs.regex` (a `<think>` block and hermes `<tool_call>` tags), which the parsers
then have to find in the generated output, streamed and whole. That needs grammars inside the
reasoning too (`--structured-outputs-config.enable_in_reasoning true`); the default, grammars
after the reasoning, has its own server at the end.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest

MODEL = "tiny-llama"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"type": "string", "enum": ["CET", "UTC"]}}}}}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALL2 = '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'


def forced(text: str) -> dict:
    """structured_outputs that make the model write exactly `text` (the random model may spell
    it with one token per character: give such requests a generous max_tokens)."""
    return {"regex": re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", text)}


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes",
                        "--structured-outputs-config.enable_in_reasoning", "true"]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def no_whitespace(tiny_llama_dir) -> dict[str, float]:
    """logit_bias banning whitespace-only tokens: JSON grammars allow unbounded whitespace, and a
    random model would spend its whole budget there instead of finishing the object."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    ids = [i for i in range(len(tok)) if tok.decode([i]).isspace()]
    assert 0 < len(ids) <= 1024
    return {str(i): -100 for i in ids}


def post(http: httpx.Client, **body) -> dict:
    resp = http.post("/v1/chat/completions",
                     json={"messages": MESSAGES, "temperature": 0, "max_tokens": 80, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream(http: httpx.Client, **body) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": MESSAGES, "temperature": 0, "max_tokens": 80,
                           "stream": True, **body}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def collect(chunks: list[dict]) -> dict:
    """A stream folded back into one message: the client-side accumulation of deltas."""
    out = {"content": "", "reasoning": "", "calls": {}, "finish": [], "ids": set()}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning"] += delta.get("reasoning") or ""
            assert delta.get("reasoning") == delta.get("reasoning_content")
            for tc in delta.get("tool_calls", []):
                call = out["calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                if "id" in tc:
                    assert tc["type"] == "function" and tc["id"].startswith("chatcmpl-tool-")
                    assert "id" not in call, "a call's id is sent once"
                    call["id"] = tc["id"]
                call["name"] += tc["function"].get("name") or ""
                call["arguments"] += tc["function"].get("arguments") or ""
            if choice["finish_reason"]:
                out["finish"].append(choice["finish_reason"])
    return out


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(tc["function"]["name"], json.loads(tc["function"]["arguments"]))
            for tc in message["tool_calls"]]


# --- named and required: constrained generation ---------------------------------------------------
def test_named_tool_choice(http, no_whitespace):
    body = {"tools": TOOLS, "logit_bias": no_whitespace,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    res = post(http, **body)["choices"][0]
    assert res["finish_reason"] == "stop" and res["message"]["content"] == ""
    [(name, args)] = calls_of(res["message"])
    assert name == "get_weather" and args["city"] in ("Paris", "Rome")
    assert res["message"]["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    streamed = collect(stream(http, **body))
    assert streamed["finish"] == ["stop"] and streamed["content"] == ""
    [call] = streamed["calls"].values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == args


def test_required_tool_choice(http, no_whitespace):
    body = {"tools": TOOLS, "tool_choice": "required", "logit_bias": no_whitespace,
            "max_tokens": 120}
    res = post(http, **body)["choices"][0]
    assert res["finish_reason"] == "tool_calls"
    calls = calls_of(res["message"])
    assert calls and all(name in ("get_weather", "get_time") for name, _ in calls)
    ids = [tc["id"] for tc in res["message"]["tool_calls"]]
    assert len(set(ids)) == len(ids)
    streamed = collect(stream(http, **body))
    assert streamed["finish"] == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == calls
    assert len({c["id"] for c in streamed["calls"].values()}) == len(calls)


def _tool_with_defs(name: str, key: str = "$defs", city_type: str = "string") -> dict:
    """Parameters as Pydantic writes them: a root-relative $ref into the schema's own $defs."""
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", key: {"Loc": {"type": "object", "required": ["city"], "properties": {
            # an enum: the tiny random-ish model would otherwise ramble inside a free string
            "city": {"type": "string", "enum": ["Paris", "Rome"]} if city_type == "string"
            else {"type": city_type}}}},
        "properties": {"loc": {"$ref": f"#/{key}/Loc"}}, "required": ["loc"]}}}


@pytest.mark.parametrize("key", ["$defs", "definitions"])
def test_required_tool_choice_with_schema_definitions(http, no_whitespace, key):
    tools = [_tool_with_defs("book", key), _tool_with_defs("cancel", key)]  # same Loc twice: fine
    res = post(http, tools=tools, tool_choice="required", logit_bias=no_whitespace,
               max_tokens=120)["choices"][0]
    assert res["finish_reason"] == "tool_calls", res
    for name, args in calls_of(res["message"]):
        assert name in ("book", "cancel") and args["loc"]["city"] in ("Paris", "Rome")


def test_required_tool_choice_schema_problems_name_the_tools(http):
    clash = [_tool_with_defs("book"), _tool_with_defs("cancel", city_type="integer")]
    resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": clash,
                                                  "tool_choice": "required"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "tools" and "$defs/Loc is defined differently" in err["message"]
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}}}]
    resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": bad,
                                                  "tool_choice": "required"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools", resp.text


def test_required_with_tiny_max_tokens_is_handled(http):
    res = post(http, tools=TOOLS, tool_choice="required", max_tokens=3)["choices"][0]
    assert res["finish_reason"] == "length" and res["message"]["tool_calls"] == []
    streamed = collect(stream(http, tools=TOOLS, tool_choice="required", max_tokens=3))
    assert streamed["finish"] == ["length"] and not streamed["calls"]


def test_tool_choice_errors(http):
    for body, message in [
        ({"tool_choice": "auto"}, "tools must be set"),
        ({"tool_choice": "required"}, "tools must be set"),
        ({"tools": [], "tool_choice": "auto"}, "must not be an empty array"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "has not been passed"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, ""),
    ]:
        resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text


# --- auto: the hermes parser finds calls in generated text ---------------------------------------
@pytest.mark.parametrize("parallel", [True, False])
def test_auto_tool_calls(http, parallel):
    body = {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": parallel,
            "structured_outputs": forced(f"</think>{CALL}{CALL2}"), "max_tokens": 400}
    message = post(http, **body)["choices"][0]
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    expected = expected if parallel else expected[:1]
    assert message["finish_reason"] == "tool_calls"
    assert calls_of(message["message"]) == expected
    assert message["message"]["content"] is None
    streamed = collect(stream(http, **body))
    assert streamed["finish"] == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == expected


def test_tool_choice_none_leaves_text_alone(http):
    message = post(http, tools=TOOLS, tool_choice="none", max_tokens=400,
                   structured_outputs=forced(f"</think>{CALL}"))["choices"][0]
    assert message["message"]["tool_calls"] == [] and message["message"]["content"] == CALL
    assert message["finish_reason"] == "stop"


def test_tool_conversation_renders(http):
    messages = [*MESSAGES,
                # SmolLM2's template concatenates content, so "" rather than None here
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22C and sunny"}]
    resp = http.post("/v1/chat/completions", json={
        "messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2,
        "return_prompt_text": True})
    assert resp.status_code == 200, resp.text


# --- reasoning ------------------------------------------------------------------------------------
def test_reasoning_and_tool_calls(http):
    text = f"<think>The user wants weather; call the tool.</think>{CALL}"
    body = {"tools": TOOLS, "structured_outputs": forced(text), "max_tokens": 400}
    choice = post(http, **body)["choices"][0]
    message = choice["message"]
    assert message["reasoning"] == "The user wants weather; call the tool."
    assert message["reasoning_content"] == message["reasoning"]
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]
    assert choice["finish_reason"] == "tool_calls"
    streamed = collect(stream(http, **body))
    assert streamed["reasoning"] == message["reasoning"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == \
        calls_of(message)
    assert streamed["finish"] == ["tool_calls"]


def test_reasoning_split_and_include_reasoning(http):
    body = {"structured_outputs": forced("<think>Two plus two.</think>Four."), "max_tokens": 400}
    message = post(http, **body)["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Two plus two.", "Four.")
    streamed = collect(stream(http, **body))
    assert (streamed["reasoning"], streamed["content"]) == ("Two plus two.", "Four.")
    hidden = post(http, include_reasoning=False, **body)["choices"][0]["message"]
    assert hidden["reasoning"] is None and hidden["content"] == "Four."
    assert collect(stream(http, include_reasoning=False, **body))["reasoning"] == ""


def test_reasoning_parser_without_marker_token_warns(server):
    # SmolLM2's tokenizer spells `</think>` with several tokens: said once, at start-up.
    assert server.log_text().count("the tokenizer has no single token for '</think>'") == 1


def test_unfinished_reasoning_is_all_reasoning(http):
    # deepseek_r1: no </think> (here: cut by max_tokens) means the whole output is reasoning.
    message = post(http, max_tokens=5)["choices"][0]["message"]
    assert message["content"] is None and message["reasoning"]


# --- default: structured outputs start after the reasoning ---------------------------------------
def test_structured_output_starts_after_reasoning(launch_server, tiny_llama_dir, http):
    """deepseek_r1 reasons until `</think>`; the grammar must leave that part alone (vLLM's
    default). A logit_bias makes the random model repeat one token: unconstrained it keeps
    doing so, all of it reasoning; under the grammar it must answer yes or no instead."""
    from transformers import AutoTokenizer
    token = AutoTokenizer.from_pretrained(str(tiny_llama_dir)).encode(" hello",
                                                                      add_special_tokens=False)[0]
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 6,
            "logit_bias": {str(token): 100}, "structured_outputs": {"choice": ["yes", "no"]}}
    inside = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert inside["reasoning"] in ("yes", "no")  # enable_in_reasoning: the grammar from token 1
    def prompt_tokens(client: httpx.Client, **extra) -> int:
        resp = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, **extra})
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens"]

    # SmolLM2's template ignores tools; this one lists them, so hiding them shows in the count.
    template = ("{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    with launch_server(["--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes",
                        "--exclude-tools-when-tool-choice-none", "--chat-template", template]) as server:
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            bare = prompt_tokens(c)
            assert prompt_tokens(c, tools=TOOLS, tool_choice="none") == bare
            assert prompt_tokens(c, tools=TOOLS, tool_choice="required") > bare
            resp = c.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            message = resp.json()["choices"][0]["message"]
            assert message["reasoning"] == " hello" * 6 and message["content"] is None
            # forced tool calls wait for the reasoning too, and only the content after it is
            # read as calls: here there is none, so no calls, whole or streamed
            forced = {**body, "tools": TOOLS, "tool_choice": "required"}
            forced.pop("structured_outputs")
            resp = c.post("/v1/chat/completions", json=forced)
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            assert choice["message"]["reasoning"] == " hello" * 6
            assert choice["message"]["tool_calls"] == [] and choice["message"]["content"] is None
            chunks = []
            with c.stream("POST", "/v1/chat/completions", json={**forced, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(json.loads(line[len("data: "):]))
            streamed = collect(chunks)
            assert streamed["reasoning"] == " hello" * 6 and not streamed["calls"]
            assert streamed["content"] == ""
            # deferred or not, a bad grammar is still refused before the engine sees it
            bad = c.post("/v1/chat/completions", json={**body, "structured_outputs": {
                "regex": "("}})
            assert bad.status_code == 400
