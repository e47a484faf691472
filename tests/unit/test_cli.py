"""`inferd serve` flag parsing: generated flags, both spellings, --no-flags, --config, errors,
and the configs the server is built from. No engine is started here."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from inferd.cli.args import engine_config_from_args, parse_human_int, server_config_from_args
from inferd.cli.main import build_parser, main, prepare_argv
from inferd.config import DEFAULT_MODEL_NAME
from inferd.entrypoints.openai.server import build_configs, load_chat_template


def parse(*argv: str) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(prepare_argv(list(argv), parser))


def test_defaults_match_the_config_dataclasses():
    ns = parse("serve", "some/model")
    engine, server = build_configs(ns)
    assert engine.model.model == "some/model"
    assert engine.model.served_model_name == ["some/model"]
    assert server.served_model_names == ["some/model"]
    assert (server.host, server.port, server.max_logprobs) == ("0.0.0.0", 8000, 20)
    assert engine.cache.enable_prefix_caching is True
    assert engine.cache.gpu_memory_utilization == 0.92
    assert server.allowed_origins == ["*"] and server.api_keys == []


def test_vllm_flag_names_both_spellings_and_values():
    ns = parse("serve", "m", "--port", "9001", "--max_model_len", "8k", "--max-num-seqs=4",
               "--served-model-name", "a", "b", "--api-key", "k1", "k2", "--max_num_batched_tokens", "1K",
               "--kv-cache-memory", "64MiB", "--block_size", "32", "--dtype", "float32",
               "--default-chat-template-kwargs", '{"enable_thinking": false}',
               "--allowed-origins", '["http://a", "http://b"]', "--uvicorn-log-level", "warning",
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning_parser", "qwen3",
               "--pooler-config", '{"pooling_type": "MEAN"}', "--runner", "pooling", "--convert", "embed")
    engine, server = build_configs(ns)
    assert server.port == 9001
    assert engine.model.max_model_len == 8000
    assert engine.scheduler.max_num_batched_tokens == 1024
    assert engine.scheduler.max_num_seqs == 4
    assert server.served_model_names == ["a", "b"] == engine.model.served_model_name
    assert server.api_keys == ["k1", "k2"]
    assert engine.cache.kv_cache_memory == "64MiB" and engine.cache.block_size == 32
    assert server.default_chat_template_kwargs == {"enable_thinking": False}
    assert server.allowed_origins == ["http://a", "http://b"]
    assert server.uvicorn_log_level == "warning"
    assert server.enable_auto_tool_choice and server.tool_call_parser == "hermes"
    assert server.reasoning_parser == "qwen3"
    assert engine.model.pooler_config == {"pooling_type": "MEAN"}
    assert (engine.model.runner, engine.model.convert) == ("pooling", "embed")
    engine, _ = build_configs(parse("serve", "m", "--cuda_graph_sizes", "1", "8", "--enforce-eager"))
    assert engine.scheduler.cuda_graph_sizes == [1, 8] and engine.model.enforce_eager


def test_boolean_flags_have_no_forms_and_queue_alias():
    ns = parse("serve", "m", "--no-enable-prefix-caching", "--enable-request-id-headers",
               "--max-num-queued-reqs", "3", "--disable-fastapi-docs", "--no-enable-chunked-prefill")
    engine, server = build_configs(ns)
    assert engine.cache.enable_prefix_caching is False
    assert engine.scheduler.enable_chunked_prefill is False
    assert server.enable_request_id_headers and server.disable_fastapi_docs
    # One flag feeds both sections that have the field.
    assert server.max_num_queued_requests == 3 == engine.scheduler.max_num_queued_requests
    assert parse("serve", "m", "--max-num-queued-requests", "5").max_num_queued_requests == 5


def test_no_model_serves_the_bundled_smollm2():
    engine, server = build_configs(parse("serve"))
    assert engine.model.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert server.served_model_names == [DEFAULT_MODEL_NAME]


def test_model_flag_and_positional():
    assert build_configs(parse("serve", "--model", "x"))[0].model.model == "x"
    assert build_configs(parse("serve", "pos", "--model", "x"))[0].model.model == "pos"


def test_config_file_supplies_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: from-yaml\nport: 7000\nmax_model_len: 1024\nenable-prefix-caching: false\n"
                   "api_key: [y1, y2]\nserved_model_name: yaml-name\n"
                   "default_chat_template_kwargs: {enable_thinking: true}\n")
    ns = parse("serve", "--config", str(cfg), "--port", "7001")
    engine, server = build_configs(ns)
    assert engine.model.model == "from-yaml"
    assert server.port == 7001  # the command line wins
    assert engine.model.max_model_len == 1024
    assert engine.cache.enable_prefix_caching is False
    assert server.api_keys == ["y1", "y2"]
    assert server.served_model_names == ["yaml-name"]
    assert server.default_chat_template_kwargs == {"enable_thinking": True}
    # A positional MODEL before --config is not swallowed by a list flag from the file.
    assert build_configs(parse("serve", "pos-model", f"--config={cfg}"))[0].model.model == "pos-model"


def test_api_key_from_environment_and_flag_wins(monkeypatch):
    monkeypatch.setenv("INFERD_API_KEY", "env-key, other")
    assert build_configs(parse("serve", "m"))[1].api_keys == ["env-key", "other"]
    assert build_configs(parse("serve", "m", "--api-key", "flag"))[1].api_keys == ["flag"]


@pytest.mark.parametrize("argv, message", [
    (["serve", "m", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["serve", "m", "--port", "abc"], "--port: invalid int value: 'abc'"),
    (["serve", "m", "--dtype", "int3"], "--dtype: invalid choice: 'int3'"),
    (["serve", "m", "--max-model-len", "lots"], "is not a whole number"),
    (["serve", "m", "--default-chat-template-kwargs", "{nope"], "is not valid JSON"),
    (["serve", "m", "--pooler-config", "[1]"], "must be a JSON object"),
    (["serve", "m", "--config", "/nonexistent.yaml"], "--config /nonexistent.yaml"),
    (["serve", "m", "--block-size", "7"], "--block-size 7 must be one of"),
    (["serve", "m", "--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["serve", "m", "--max-num-queued-requests", "-1"], "--max-num-queued-requests -1 must be >= 0"),
    (["serve", "m", "--chat-template", "/no/such/template.jinja"], "no such file"),
    (["serve", "m", "--structured-outputs-config.backend", "outlines"], "only auto and xgrammar"),
    (["serve", "m", "--structured-outputs-config.nope", "1"], "unsupported key(s) ['nope']"),
    (["serve", "m", "--structured-outputs-config.enable_in_reasoning"], "needs a value"),
    (["serve", "m", "--cuda-graph-sizes", "8", "x"], "--cuda-graph-sizes takes whole numbers"),
    (["serve", "m", "--cuda-graph-sizes", "0"], "--cuda-graph-sizes must be between 1 and 4096"),
    (["serve", "m", "--reasoning-parser", "nope"],
     "Unknown reasoning parser 'nope'; valid names: deepseek_r1, qwen3"),
    (["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser", "bogus"],
     "Unknown tool call parser 'bogus'"),
    (["serve", "--runner", "pooling"], "pooling (--runner pooling / --convert) is not supported "
                                       "for GGUF checkpoints"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_flags_are_clear_usage_errors(argv, message, capsys):
    # Value checks live in the config dataclasses; they fail before any engine starts, and the
    # CLI reports them as usage errors like argparse's own.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_structured_outputs_config_json_and_dotted():
    assert build_configs(parse("serve", "m"))[1].structured_outputs_config == {}
    server = build_configs(parse("serve", "m", "--structured-outputs-config.enable_in_reasoning",
                                 "true"))[1]
    assert server.structured_outputs_config == {"enable_in_reasoning": True}
    # JSON and dotted keys merge (dotted wins), in either spelling, with `=` or a separate value
    ns = parse("serve", "m", "--structured_outputs_config", '{"backend": "xgrammar", '
               '"enable_in_reasoning": true}', "--structured-outputs-config.enable-in-reasoning=false",
               "--port", "9")
    assert build_configs(ns)[1].structured_outputs_config == {"backend": "xgrammar",
                                                              "enable_in_reasoning": False}
    assert build_configs(ns)[1].port == 9


def test_human_readable_token_counts():
    assert parse_human_int("4096") == 4096
    assert parse_human_int("8k") == 8000 and parse_human_int("8K") == 8192
    assert parse_human_int("1M") == 2**20
    assert parse_human_int("auto") is None and parse_human_int("-1") is None


def test_chat_template_inline_or_file(tmp_path):
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert load_chat_template(inline) == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert load_chat_template(str(path)) == inline
    assert load_chat_template(None) is None


def test_sections_build_without_the_server_flags():
    # `generate` has the engine flags only; the same builder serves both.
    parser = build_parser()
    ns = parser.parse_args(prepare_argv(["generate", "m", "--prompt", "hi", "--max_model_len", "64"], parser))
    engine = engine_config_from_args(ns, "m")
    assert engine.model.max_model_len == 64 and ns.prompt == ["hi"]
    assert not hasattr(ns, "port")
    assert server_config_from_args(argparse.Namespace()).port == 8000


def test_help_lists_generated_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-num-queued-requests", "--max-num-queued-reqs", "--no-enable-prefix-caching",
                 "--kv-cache-memory", "--enable-server-load-tracking", "--ssl-certfile", "--config"):
        assert flag in out


@dataclasses.dataclass
class _Documented:
    plain: int = 1
    """One line."""
    spread: list[int] = dataclasses.field(
        default_factory=list)
    """Over "two"
    lines, with a \"quote\"."""
    undocumented: int = 0
    after_comment: str = "x"  # a comment between field and doc does not matter
    """Still read."""


def test_field_docs_read_the_docstrings_under_fields():
    from inferd.cli.args import field_docs
    assert field_docs(_Documented) == {
        "plain": "One line.", "spread": 'Over "two" lines, with a "quote".',
        "after_comment": "Still read."}


def test_a_failed_engine_start_leaves_nothing_behind(tmp_path):
    """The pooling-on-GGUF refusal comes after the engine client has opened its sockets. They,
    the ZMQ context and the IPC directory must go with it: a context collected later with a
    socket still open blocked the collecting thread forever (a 600 s CI stall)."""
    import subprocess
    import sys
    code = ("import gc, sys\n"
            "from inferd.cli.main import main\n"
            "try:\n    main(['serve', '--runner', 'pooling'])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "gc.collect()\n"
            "sys.exit(0 if code == 2 else 1)\n")
    env = {**__import__("os").environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert not list(tmp_path.glob("inferd-*"))  # the IPC directory is gone
