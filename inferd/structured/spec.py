"""From a request's `StructuredOutputsParams` to a `GrammarSpec`: one hashable value per grammar.

Everything here is plain Python (no xgrammar), so it is cheap, testable on its own and shared by
the API process (validation) and the engine process (compilation). Normalising first gives the
compile cache a stable key and lets us reject oversized or malformed specs with a readable
message before any native code sees them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from inferd.sampling_params import StructuredOutputsParams

# Size caps. xgrammar's compile time grows with the spec (and superlinearly with schema nesting:
# ~1 s for 200 nested arrays, ~10 s for 500 on a laptop core), so the HTTP layer must not hand it
# arbitrarily large input. The caps are far above real-world tool/response schemas.
MAX_SCHEMA_CHARS = 128 * 1024  # serialized JSON schema or structural tag
MAX_SCHEMA_DEPTH = 128  # nesting of the schema *document* (objects and arrays)
MAX_REGEX_CHARS = 16 * 1024
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 64 * 1024  # all choices together

# The compile method a spec goes to.
Method = Literal["json_schema", "regex", "ebnf", "lark", "structural_tag"]

# What `json_object` means: any JSON object (vLLM compiles the same schema for it).
_ANY_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class GrammarSpec:
    """A normalised, size-checked grammar request; equal specs compile to the same grammar."""

    method: Method
    source: str  # schema / structural tag as canonical JSON text, regex or grammar text
    label: str  # what the user gave, for messages: "JSON schema", "regex", "grammar", ...
    any_whitespace: bool = True  # JSON only: False = compact, single-space separators


def build_spec(params: StructuredOutputsParams) -> GrammarSpec:
    """Check and normalise `params`; raise ValueError naming the problem."""
    params.validate()  # exactly one constraint, non-empty choice / grammar
    any_ws = not params.disable_any_whitespace
    # `whitespace_pattern` is an outlines option; xgrammar has no equivalent, and vLLM's
    # xgrammar backend ignores it too, so we accept and ignore it rather than 400.
    if params.json is not None and params.json is not False:
        schema = _load_json(params.json, "JSON schema")
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"Invalid JSON schema: must be a JSON object or boolean, "
                             f"got {type(schema).__name__}")
        check_enforceable(schema)
        if params.disable_additional_properties:
            _forbid_additional_properties(schema)
        return GrammarSpec("json_schema", _dump_json(schema, "JSON schema"), "JSON schema", any_ws)
    if params.json_object:
        return GrammarSpec("json_schema", _ANY_OBJECT_SCHEMA, "JSON object", any_ws)
    if params.regex is not None:
        _check_text(params.regex, "regex", MAX_REGEX_CHARS, blank_ok=True)  # " " is a fine regex
        return GrammarSpec("regex", params.regex, "regex")
    if params.choice is not None:
        return GrammarSpec("ebnf", choice_to_ebnf(params.choice), "choice")
    if params.grammar is not None:
        _check_text(params.grammar, "grammar", MAX_GRAMMAR_CHARS)
        method: Method = "ebnf" if is_ebnf(params.grammar) else "lark"
        label = "grammar" if method == "ebnf" else "grammar (read as Lark: it has no '::=' rule)"
        return GrammarSpec(method, params.grammar, label)
    if params.structural_tag is not None:
        return GrammarSpec("structural_tag", _structural_tag_source(params.structural_tag),
                           "structural tag")
    raise ValueError("structured_outputs sets no constraint")  # unreachable after validate()


# --- JSON schema ------------------------------------------------------------------------------
def _load_json(value: Any, label: str) -> Any:
    """A fresh, depth-checked copy of `value` (str: parsed; dict: deep-copied via JSON)."""
    if isinstance(value, str):
        if len(value) > MAX_SCHEMA_CHARS:
            raise ValueError(f"Invalid {label}: {len(value)} characters exceeds the limit of "
                             f"{MAX_SCHEMA_CHARS}")
        try:
            loaded = json.loads(value)
        except RecursionError:
            raise ValueError(f"Invalid {label}: nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
        except ValueError as e:
            raise ValueError(f"Invalid {label}: not valid JSON ({e})") from None
    else:
        # Round-trip through JSON: checks serialisability and gives us a copy we may rewrite
        # (disable_additional_properties) without touching the caller's object.
        loaded = json.loads(_dump_json(value, label))
    depth = _json_depth(loaded)
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"Invalid {label}: nested {depth} levels deep, the limit is {MAX_SCHEMA_DEPTH}")
    return loaded


def _dump_json(value: Any, label: str) -> str:
    try:
        # Key order is kept (not sorted): xgrammar emits properties in schema order, so two
        # schemas differing only in order are different grammars.
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError(f"Invalid {label}: nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"Invalid {label}: not serialisable as JSON ({e})") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(f"Invalid {label}: {len(text)} characters exceeds the limit of {MAX_SCHEMA_CHARS}")
    return text


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON document, iteratively (no recursion limit to trip)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children)
    return deepest


# Keywords whose value is one subschema / a list of subschemas / a name -> subschema map.
# Walking only these (not every dict) keeps a property *named* "properties" from being mistaken
# for a schema.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then",
              "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _schema_nodes(schema: Any) -> Iterator[tuple[dict, str]]:
    """Every (sub)schema object with its JSON-pointer path. A node's subschemas are read after
    the caller has seen it, so the caller may rewrite a node before the walk goes below it."""
    stack: list[tuple[Any, str]] = [(schema, "#")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, path
        for key in _SUBSCHEMA:
            if isinstance(node.get(key), dict):
                stack.append((node[key], f"{path}/{key}"))
        for key in _SUBSCHEMA_LIST:
            if isinstance(node.get(key), list):
                stack.extend((sub, f"{path}/{key}/{i}") for i, sub in enumerate(node[key]))
        for key in _SUBSCHEMA_MAP:
            if isinstance(node.get(key), dict):
                stack.extend((sub, f"{path}/{key}/{name}") for name, sub in node[key].items())


def _forbid_additional_properties(schema: Any) -> None:
    """Set `additionalProperties: false` on every object schema that declares properties but
    leaves additional ones open by default (vLLM's `disable_additional_properties`)."""
    for node, _ in _schema_nodes(schema):
        if ("properties" in node or "patternProperties" in node) and "additionalProperties" not in node:
            node["additionalProperties"] = False


# xgrammar (0.2.x) compiles schemas with these keywords but does not enforce them: the grammar
# would let the model write JSON the schema forbids, and the client would only find out by
# validating. A 400 naming the keyword is the honest answer. (Annotations such as `format` on
# unknown names, `contentEncoding`, `title` or `default` constrain nothing and stay allowed.)
_UNENFORCED = ("not", "if", "then", "else", "contains", "minContains", "maxContains",
               "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef",
               "$recursiveRef")
# What an allOf member may hold for us to merge it into its parent (xgrammar enforces a
# single-member allOf but only part of a longer one).
_MERGEABLE = {"type", "properties", "required", "title", "description"}


def check_enforceable(schema: Any) -> None:
    """Refuse (ValueError) schema keywords the grammar would silently drop; merge an allOf of
    plain object schemas into its parent, the form Pydantic-style composition produces."""
    for node, path in _schema_nodes(schema):
        for key in _UNENFORCED:
            if key in node:
                raise ValueError(f"Invalid JSON schema: '{key}' at {path} is not supported by "
                                 "structured outputs (it would not be enforced)")
        if node.get("uniqueItems") is True:
            raise ValueError(f"Invalid JSON schema: 'uniqueItems' at {path} is not supported by "
                             "structured outputs (it would not be enforced)")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise ValueError(f"Invalid JSON schema: $ref {ref[:200]!r} at {path} is not a local "
                             "reference; only '#...' references into the schema itself are supported")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            _merge_all_of(node, path)  # before the walk reads its (now merged) properties


def _merge_all_of(node: dict, path: str) -> None:
    members = node.pop("allOf")
    props: dict[str, Any] = dict(node.get("properties") or {})
    required: list[str] = list(node.get("required") or [])
    for i, sub in enumerate(members):
        where = f"{path}/allOf/{i}"
        if not isinstance(sub, dict) or not set(sub) <= _MERGEABLE or sub.get("type", "object") != "object":
            raise ValueError(f"Invalid JSON schema: allOf at {path} is supported only with one "
                             f"member or with plain object members (type, properties, required); "
                             f"{where} is not one")
        for name, prop in (sub.get("properties") or {}).items():
            if name in props and props[name] != prop:
                raise ValueError(f"Invalid JSON schema: allOf members at {path} give property "
                                 f"{name!r} different schemas")
            props[name] = prop
        required += [r for r in sub.get("required") or [] if r not in required]
    if node.get("type", "object") != "object":
        raise ValueError(f"Invalid JSON schema: allOf at {path} merges objects into type "
                         f"{node['type']!r}")
    node["type"], node["properties"] = "object", props
    if required:
        node["required"] = required


# --- regex / grammar / choice -------------------------------------------------------------------
def _check_text(text: Any, label: str, limit: int, *, blank_ok: bool = False) -> None:
    if not isinstance(text, str):
        raise ValueError(f"Invalid {label}: must be a string, got {type(text).__name__}")
    if not (text if blank_ok else text.strip()):
        raise ValueError(f"Invalid {label}: must not be empty")
    if len(text) > limit:
        raise ValueError(f"Invalid {label}: {len(text)} characters exceeds the limit of {limit}")


def is_ebnf(grammar: str) -> bool:
    """GBNF-style EBNF defines rules with '::='; Lark uses 'rule: ...'. vLLM accepts both."""
    return any("::=" in line.split("#", 1)[0] for line in grammar.splitlines())


def ebnf_string_literal(text: str) -> str:
    """`text` as an xgrammar EBNF string literal: quotes and backslashes escaped, control
    characters as \\xHH (raw non-ASCII is fine: the grammar is UTF-8)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def choice_to_ebnf(choices: list[str]) -> str:
    """A grammar matching exactly one of `choices` (duplicates dropped, order kept)."""
    if not isinstance(choices, list) or not choices:
        raise ValueError("Invalid choice: must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"Invalid choice: {len(choices)} options exceeds the limit of {MAX_CHOICES}")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ValueError(f"Invalid choice: options must be strings, got {type(bad[0]).__name__}")
    total = sum(len(c) for c in choices)
    if total > MAX_CHOICE_CHARS:
        raise ValueError(f"Invalid choice: {total} characters in all exceeds the limit of {MAX_CHOICE_CHARS}")
    unique = list(dict.fromkeys(choices))
    return "root ::= " + " | ".join(ebnf_string_literal(c) for c in unique)


# --- structural tag ---------------------------------------------------------------------------
def _structural_tag_source(tag: Any) -> str:
    """Canonical JSON of the structural tag, in xgrammar's `{"type", "format"}` form.

    vLLM also accepts the older `{"structures": [{begin, schema, end}], "triggers": [...]}`
    form; it maps onto xgrammar's `triggered_tags` format, so we translate it here.
    """
    obj = _load_json(tag, "structural tag")
    if not isinstance(obj, dict):
        raise ValueError(f"Invalid structural tag: must be a JSON object, got {type(obj).__name__}")
    if "structures" in obj:
        obj = _from_legacy_structural_tag(obj)
    return _dump_json(obj, "structural tag")


def _from_legacy_structural_tag(obj: dict) -> dict:
    structures, triggers = obj.get("structures"), obj.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ValueError("Invalid structural tag: 'structures' must be a non-empty list")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("Invalid structural tag: 'triggers' must be a non-empty list of strings")
    tags = []
    for i, s in enumerate(structures):
        if not (isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                and isinstance(s.get("schema"), (dict, bool))):
            raise ValueError(f"Invalid structural tag: structures[{i}] needs string 'begin' and "
                             "'end' and an object 'schema'")
        tags.append({"type": "tag", "begin": s["begin"], "end": s["end"],
                     "content": {"type": "json_schema", "json_schema": s["schema"]}})
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}
