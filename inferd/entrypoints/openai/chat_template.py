"""Render a chat conversation to prompt text with a Hugging Face style Jinja chat template.

Chat templates are code from the model repository (or, with `--trust-request-chat-template`, from
the request), so they run in Jinja's immutable sandbox: no attribute access to Python internals,
no mutation of the data we pass in, and a `namespace` that refuses underscore names. The template
sees the conventions `transformers.apply_chat_template` provides (messages, tools, documents,
add_generation_prompt, the tokenizer's special tokens, `raise_exception`, `strftime_now`), with the
same whitespace settings, so a prompt rendered here matches the one transformers renders.

Every failure a request can cause raises `BadRequest` (400); nothing here is a server error.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferd.entrypoints.openai.errors import BadRequest

ContentFormat = Literal["auto", "string", "openai"]

NO_TEMPLATE_MESSAGE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a "
    "chat template if the tokenizer does not define one.")
UNTRUSTED_TEMPLATE_MESSAGE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template.")

# Appended to the final message when continuing it, then cut away with everything after it: what
# stays is the prompt up to the last character the model should continue from. The trailing space
# tells whether the template trims message content; if it does, trailing spaces go too (as in HF).
_CONTINUE_TAG = "<<inferd-continue-final-message>> "
_REASONING_ALIASES = ("reasoning_content", "thinking", "reasoning")
_TEXT_PART_TYPES = ("text", "input_text", "output_text")


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace()` that refuses underscore-prefixed names, which would let a template
    reach dunder attributes through the namespace object."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed namespace attributes ({name!r})")


class _DictFactory:
    """`dict(...)` for templates without exposing the `dict` type itself (whose class attributes
    are a path out of the sandbox)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes; chat templates expect plain JSON (as transformers does).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# A template may not build a string or list longer than this by repetition, nor raise to a power
# above MAX_EXPONENT: `'a' * 10**10` would otherwise take the server's memory down with it.
MAX_REPEAT_LEN = 1 << 20
MAX_EXPONENT = 1024


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus bounds on the two operators that can exhaust memory or
    CPU in one expression (the sandbox already bounds `range`)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(f"exponent {right} is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_REPEAT_LEN:
                    raise jinja2.exceptions.SecurityError("repetition result is too long")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_DictFactory(), namespace=_SafeNamespace)
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # Compiling costs milliseconds; a server renders the same one or two templates per request.
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise BadRequest(f"Invalid chat template: {e}", param="chat_template") from e


@lru_cache(maxsize=32)
def detect_content_format(template: str) -> Literal["string", "openai"]:
    """'openai' when the template loops over a message's content (a list of typed parts),
    else 'string'."""
    try:
        ast = _environment().parse(template)
    except jinja2.TemplateError:
        return "string"
    content_vars = {a.target.name for a in ast.find_all(jinja2.nodes.Assign)
                    if isinstance(a.target, jinja2.nodes.Name) and _reads_content(a.node)}
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Filter) and it.node is not None:
            it = it.node  # e.g. `for part in message['content'] | selectattr(...)`
        if _reads_content(it) or (isinstance(it, jinja2.nodes.Name) and it.name in content_vars):
            return "openai"
    return "string"


def _reads_content(node: jinja2.nodes.Node) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return False


def select_template(server_template: str | None, request_template: str | None, trusted: bool,
                    tokenizer: Any = None) -> str:
    """The template for one request: the request's own (only when the server trusts request
    templates), else the server's (--chat-template or the model's), else the tokenizer's."""
    if request_template is not None:
        if not trusted:
            raise BadRequest(UNTRUSTED_TEMPLATE_MESSAGE, param="chat_template")
        return request_template
    template = server_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates; "default" is the plain chat one
        template = template.get("default")
    if not template:
        raise BadRequest(NO_TEMPLATE_MESSAGE)
    return template


def render_chat(messages: list[Mapping[str, Any]], *, template: str,
                special_tokens: Mapping[str, str] | None = None,
                tools: list[Mapping[str, Any]] | None = None,
                documents: list[Mapping[str, Any]] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                content_format: ContentFormat = "auto",
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for `messages` (OpenAI chat format, already JSON-decoded).

    `special_tokens` is the tokenizer's `special_tokens_map` (bos_token, eos_token, ...);
    `template_kwargs` are extra template variables (chat_template_kwargs, reasoning_effort).
    """
    if add_generation_prompt and continue_final_message:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` "
                         "to True.", param="continue_final_message")
    if not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    if content_format == "auto":
        content_format = detect_content_format(template)
    chat = [_normalize_message(m, i, content_format) for i, m in enumerate(messages)]
    if continue_final_message:
        _tag_final_message(chat[-1])
    # Explicit arguments win over same-named chat_template_kwargs; the tokens come first so a
    # request may not silently change what `bos_token` means either.
    context: dict[str, Any] = {**(template_kwargs or {}), **(special_tokens or {})}
    context.update(messages=chat, tools=list(tools) if tools else None,
                   documents=list(documents) if documents else None,
                   add_generation_prompt=add_generation_prompt)
    compiled = _compile(template)
    try:
        text = compiled.render(**context)
    except jinja2.TemplateError as e:  # includes SecurityError, UndefinedError, raise_exception
        raise BadRequest(f"Chat template error: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError) as e:
        # A template doing arithmetic or indexing on what the request sent fails this way.
        raise BadRequest(f"Chat template error: {type(e).__name__}: {e}") from e
    if continue_final_message:
        text = _cut_at_tag(text)
    return text


def _normalize_message(message: Mapping[str, Any], index: int, content_format: str) -> dict:
    """A plain dict as HF templates expect it: content as a string or as a list of text parts,
    tool-call arguments as objects, reasoning under all of its usual names."""
    if not isinstance(message, Mapping):
        raise BadRequest(f"messages[{index}] must be an object", param="messages")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"messages[{index}].role must be a non-empty string", param="messages")
    out = {k: v for k, v in message.items() if v is not None or k == "content"}
    content = message.get("content")
    if content is None:
        # An assistant turn with only tool calls comes back from the SDKs with content None
        # (or none at all); templates concatenate it, so it renders as empty, as vLLM does.
        out["content"] = [] if content_format == "openai" and role != "tool" else ""
    else:
        texts = [content] if isinstance(content, str) else _text_parts(content, index)
        # Tool results are always flattened: templates print them as a string.
        if content_format == "openai" and role != "tool":
            out["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            out["content"] = "\n".join(texts)
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise BadRequest(f"messages[{index}].tool_calls must be a list", param="messages")
        out["tool_calls"] = [_normalize_tool_call(tc, index) for tc in calls]
    reasoning = next((message[k] for k in _REASONING_ALIASES if message.get(k) is not None), None)
    if reasoning is not None:
        out.update(reasoning_content=reasoning, thinking=out.get("thinking", reasoning))
    return out


def _text_parts(content: Any, index: int) -> list[str]:
    if not isinstance(content, list):
        raise BadRequest(f"messages[{index}].content must be a string or a list of parts",
                         param="messages")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise BadRequest(f"messages[{index}].content parts must be objects", param="messages")
        kind = part.get("type") or ("text" if "text" in part else None)
        if kind in _TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}]: a {kind} part needs a string 'text'",
                                 param="messages")
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise BadRequest(f"messages[{index}]: content part type {kind!r} is not supported "
                             "by this text-only model", param="messages")
    return texts


def _normalize_tool_call(call: Any, index: int) -> dict:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise BadRequest(f"messages[{index}].tool_calls entries need a 'function' object",
                         param="messages")
    function = dict(call["function"])
    args = function.get("arguments")
    if isinstance(args, str):
        # Templates print arguments with `| tojson` or iterate them as a mapping.
        try:
            function["arguments"] = json.loads(args)
        except (json.JSONDecodeError, RecursionError):  # nested past the parser's limit: a string
            pass
    return {**call, "function": function}


def _tag_final_message(message: dict) -> None:
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + _CONTINUE_TAG
        return
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] += _CONTINUE_TAG
                return
    raise BadRequest("continue_final_message is set but the final message has no text to continue",
                     param="continue_final_message")


def _cut_at_tag(text: str) -> str:
    at = text.rfind(_CONTINUE_TAG.rstrip())
    if at < 0:
        raise BadRequest("continue_final_message is set but the final message does not appear in "
                         "the chat after applying the chat template",
                         param="continue_final_message")
    if text.startswith(_CONTINUE_TAG, at):
        return text[:at]
    return text[:at].rstrip()


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's named special tokens as template variables (bos_token, eos_token, ...)."""
    tokens = getattr(tokenizer, "special_tokens_map", None) or {}
    return {k: v for k, v in tokens.items() if isinstance(v, str)}


def tools_for_template(tools: Iterable[Any] | None) -> list[dict] | None:
    """Tool definitions as plain dicts (the request's pydantic models dumped)."""
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else dict(t) for t in tools]
