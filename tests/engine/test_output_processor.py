"""OutputProcessor: streamed deltas concatenate to the final text, whatever ends the request."""
from __future__ import annotations

import pytest

from inferd.engine.output_processor import OutputProcessor
from inferd.engine.protocol import EngineCoreOutput, FinishReason
from inferd.sampling_params import OutputKind, SamplingParams

TOKENS = [18741, 30581, 30581, 216, 9038, 30581]  # ends mid-character: held back until the end


@pytest.mark.parametrize("finish", [FinishReason.LENGTH, FinishReason.ABORT, FinishReason.STOP])
def test_deltas_concatenate_to_final_text(smollm2_tokenizer, finish):
    results = {}
    for kind in (OutputKind.DELTA, OutputKind.FINAL_ONLY):
        proc = OutputProcessor(smollm2_tokenizer)
        got = []
        sp = SamplingParams(max_tokens=len(TOKENS), output_kind=kind)
        proc.add_request("r", None, [1, 2, 3], sp, [0], got.append)
        for i, tok in enumerate(TOKENS):
            last = i == len(TOKENS) - 1
            proc.process([EngineCoreOutput("r", [tok], finish_reason=finish if last else None)])
        results[kind] = got
    final = results[OutputKind.FINAL_ONLY]
    assert len(final) == 1 and final[0].finished
    streamed = "".join(o.outputs[0].text for o in results[OutputKind.DELTA] if o.outputs)
    assert streamed == final[0].outputs[0].text
    ids = [t for o in results[OutputKind.DELTA] for c in o.outputs for t in c.token_ids]
    assert ids == TOKENS
    assert sum(1 for o in results[OutputKind.DELTA] for c in o.outputs if c.finish_reason) == 1


def test_stop_string_aborts_engine_request_and_trims(smollm2_tokenizer):
    proc = OutputProcessor(smollm2_tokenizer)
    text_ids = smollm2_tokenizer.encode("Hello world. Goodbye", add_special_tokens=False)
    got = []
    proc.add_request("s", None, [1], SamplingParams(max_tokens=50, stop=["world"]), [0], got.append)
    aborts = []
    for tok in text_ids:
        aborts += proc.process([EngineCoreOutput("s", [tok])])
        if got and got[-1].finished:
            break
    assert aborts == ["s"]
    out = got[-1].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "world" and out.text == "Hello "
    assert proc.parents == {}
