"""Chat template rendering: parity with transformers' apply_chat_template, HF conventions, and the
sandbox (templates are untrusted code from the model repo or, when allowed, from the request)."""
from __future__ import annotations

import jinja2
import pytest

from inferd.entrypoints.openai.chat_template import detect_content_format, render_chat, \
    select_template, special_tokens_of
from inferd.entrypoints.openai.errors import BadRequest

# A Qwen2.5-style template: tools in the system prompt, tool calls and tool results in turns,
# content read as a string. Rendered by both transformers and us from the same text.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Loops over content parts: the "openai" content format.
PARTS_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{% for p in m['content'] %}[{{ p.text }}]"
                  "{% endfor %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Ünïcödé ✓ 🚀"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "call_1", "type": "function",
          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "22C"}],
    [{"role": "user", "content": "a\n\n  spaced  "}, {"role": "assistant", "content": "ok"},
     {"role": "custom_role", "content": "custom"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def ours(tok, messages, template=None, **kw):
    return render_chat(messages, template=template or tok.chat_template,
                       special_tokens=special_tokens_of(tok), **kw)


# SmolLM2's template concatenates content, so only conversations with string content everywhere.
STRING_CONVERSATIONS = [i for i, c in enumerate(CONVERSATIONS)
                        if all(isinstance(m.get("content"), str) for m in c)]


@pytest.mark.parametrize("conv", STRING_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(tok, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    expected = tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    assert ours(tok, messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_tool_template_matches_transformers(tok, conv):
    messages = CONVERSATIONS[conv]
    expected = tok.apply_chat_template(messages, tools=TOOLS, chat_template=TOOL_TEMPLATE,
                                       tokenize=False, add_generation_prompt=True)
    assert ours(tok, messages, TOOL_TEMPLATE, tools=TOOLS) == expected
    assert '"name": "get_weather"' in expected


def test_tool_call_arguments_string_becomes_object(tok):
    # OpenAI clients send arguments as a JSON string; templates print them with tojson.
    as_object = CONVERSATIONS[2]
    as_string = [dict(m) for m in as_object]
    as_string[1] = {**as_object[1], "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert ours(tok, as_string, TOOL_TEMPLATE, tools=TOOLS) == \
        ours(tok, as_object, TOOL_TEMPLATE, tools=TOOLS)


@pytest.mark.parametrize("missing", [None, "absent"])
def test_tool_call_turn_without_content_renders_as_empty(tok, missing):
    """SDKs send back an assistant tool-call turn with content None (or none at all); a
    template that concatenates it must not fail. SmolLM2's template does `+ content`."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = {"role": "assistant", "tool_calls": [call]}
    if missing is None:
        turn["content"] = None
    msgs = [{"role": "user", "content": "Weather?"}, turn,
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    empty = [msgs[0], {**turn, "content": ""}, msgs[2]]
    assert ours(tok, msgs) == ours(tok, empty)
    assert ours(tok, msgs, TOOL_TEMPLATE, tools=TOOLS) == ours(tok, empty, TOOL_TEMPLATE,
                                                                tools=TOOLS)
    # a parts template iterates the content: an empty list, not a string
    assert ours(tok, msgs[:2], PARTS_TEMPLATE) == "<user>[Weather?]<assistant><assistant>"


def test_list_content_flattened_for_string_templates(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"},
                                          {"text": "second"}]}]
    flat = [{"role": "user", "content": "first\nsecond"}]
    assert detect_content_format(tok.chat_template) == "string"
    assert ours(tok, parts) == tok.apply_chat_template(flat, tokenize=False,
                                                       add_generation_prompt=True)


def test_list_content_kept_for_part_templates(tok):
    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "user", "content": parts},
            {"role": "assistant", "content": "c"}]
    assert ours(tok, msgs, PARTS_TEMPLATE) == "<user>[a][b]<assistant>[c]<assistant>"
    # forced string format joins the parts even for such a template
    assert ours(tok, msgs[:1], "{{ messages[0].content }}", content_format="string") == "a\nb"


def test_non_text_parts_are_rejected(tok):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(BadRequest, match="not supported"):
        ours(tok, msgs)


@pytest.mark.parametrize("final", ["The answer is", "Trailing space ", ""])
def test_continue_final_message_matches_transformers(tok, final):
    msgs = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": final}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                       continue_final_message=True)
    got = ours(tok, msgs, add_generation_prompt=False, continue_final_message=True)
    assert got == expected
    assert not got.endswith("<|im_end|>\n")


def test_continue_final_message_excludes_generation_prompt(tok):
    with pytest.raises(BadRequest, match="continue_final_message"):
        ours(tok, CONVERSATIONS[0], add_generation_prompt=True, continue_final_message=True)


def test_special_tokens_and_kwargs_reach_the_template(tok):
    template = "{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ reasoning_effort }}"
    got = ours(tok, CONVERSATIONS[0], template,
               template_kwargs={"enable_thinking": False, "reasoning_effort": "low",
                                "bos_token": "spoofed"})
    assert got == f"{tok.bos_token}|{tok.eos_token}|False|low"


def test_raise_exception_is_a_bad_request(tok):
    with pytest.raises(BadRequest, match="roles must alternate"):
        ours(tok, CONVERSATIONS[0], "{{ raise_exception('roles must alternate') }}")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ dict.__class__ }}{{ dict.__call__.__globals__ }}",
    "{{ 'a' * 10**10 }}",
    "{{ [0] * 10**9 }}",
    "{{ 7 ** 100000000 }}",
])
def test_sandbox_blocks_escapes(tok, template):
    with pytest.raises(BadRequest) as info:
        ours(tok, CONVERSATIONS[0], template)
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_broken_template_syntax_is_a_bad_request(tok):
    with pytest.raises(BadRequest, match="Invalid chat template"):
        ours(tok, CONVERSATIONS[0], "{% for %}")


def test_select_template():
    assert select_template("server", None, trusted=False) == "server"
    assert select_template(None, "req", trusted=True) == "req"
    with pytest.raises(BadRequest, match="trust-request-chat-template"):
        select_template("server", "req", trusted=False)
    with pytest.raises(BadRequest, match="default chat template is no longer allowed"):
        select_template(None, None, trusted=False)


def test_bad_messages_are_bad_requests(tok):
    with pytest.raises(BadRequest):
        ours(tok, [])
    with pytest.raises(BadRequest, match="role"):
        ours(tok, [{"content": "no role"}])
    with pytest.raises(BadRequest):
        ours(tok, [{"role": "user", "content": 5}])
