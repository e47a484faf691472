"""`inferd serve|generate|bench`: the command-line entry point.

Flags come from the config dataclasses (inferd/cli/args.py); `serve` hands the parsed flags to
`inferd.entrypoints.openai.server.run_server`.
"""
from __future__ import annotations

import argparse
import inspect
import runpy
import sys
from pathlib import Path
from typing import Sequence

from inferd.cli.args import (add_config_flags, add_engine_flags, expand_config_file, non_default_args,
                             merge_dotted_flags, normalize_flag_spelling)
from inferd.config import ConfigError
from inferd.entrypoints.openai.state import ServerConfig
from inferd.version import __version__

SUBCOMMANDS = ("serve", "generate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="A vLLM-compatible LLM inference server.")
    parser.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="{serve,generate,bench}")

    serve = sub.add_parser("serve", help="Serve a model over the OpenAI-compatible HTTP API.",
                           description="Serve a model over the OpenAI-compatible HTTP API.")
    add_engine_flags(serve)
    add_config_flags(serve, [ServerConfig])
    serve.add_argument("--config", metavar="FILE.yaml",
                       help="Read flags from a YAML mapping (flag names as keys); the command line wins.")
    serve.set_defaults(func=cmd_serve, _parser=serve)

    generate = sub.add_parser("generate", help="Generate text for prompts offline (no server).")
    add_engine_flags(generate)
    generate.add_argument("--prompt", action="append", required=True,
                          help="A prompt; repeat the flag for several.")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--config", metavar="FILE.yaml", help="Read flags from a YAML mapping.")
    generate.set_defaults(func=cmd_generate, _parser=generate)

    bench = sub.add_parser("bench", help="Run a benchmark script from benchmarks/ (source checkout).")
    bench.add_argument("kind", nargs="?", default="throughput", help="throughput | latency | serving")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="Passed to the benchmark.")
    bench.set_defaults(func=cmd_bench)
    return parser


def prepare_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Normalise `--x_y` spellings and splice in `--config` flags after the subcommand (and
    after a leading positional MODEL, so a list flag from the file cannot swallow it)."""
    argv = normalize_flag_spelling(argv)
    if not argv or argv[0] not in SUBCOMMANDS or argv[0] == "bench":
        return argv
    head, rest = [argv[0]], argv[1:]
    if rest and not rest[0].startswith("-"):
        head, rest = head + [rest[0]], rest[1:]
    rest = normalize_flag_spelling(expand_config_file(rest, parser.error))
    try:
        return head + merge_dotted_flags(rest)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))


def cmd_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from inferd.entrypoints.openai.server import run_server
    try:
        return run_server(ns, non_default_args(ns._parser, ns))
    except ConfigError as e:
        ns._parser.error(str(e))
    return 2  # not reached: parser.error exits


def cmd_generate(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from inferd.entrypoints.llm import LLM
    from inferd.sampling_params import SamplingParams
    # LLM takes the engine flags as keyword arguments: pass those it names.
    accepted = inspect.signature(LLM).parameters
    kwargs = {k: v for k, v in vars(ns).items() if k in accepted}
    kwargs["model"] = ns.model_tag or ns.model
    try:
        llm = LLM(**kwargs)
    except ConfigError as e:
        ns._parser.error(str(e))
    outputs = llm.generate(ns.prompt, SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature))
    for prompt, out in zip(ns.prompt, outputs):
        print(f"Prompt: {prompt!r}\nGenerated: {out.outputs[0].text!r}\n")
    return 0


def cmd_bench(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if ns.kind == "serve":  # ships in the package, so it works from any folder
        from inferd.bench.serve import main as bench_serve
        return bench_serve(list(ns.bench_args))
    script = Path.cwd() / "benchmarks" / f"{ns.kind}.py"
    if not script.exists():
        parser.error(f"no benchmark {script}; run `inferd bench` from a source checkout "
                     "that has benchmarks/")
    sys.argv = [str(script), *ns.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = prepare_argv(list(sys.argv[1:] if argv is None else argv), parser)
    ns = parser.parse_args(args)
    return ns.func(ns, parser)


if __name__ == "__main__":
    sys.exit(main())
