"""Structured outputs (JSON schema, regex, choice, grammar, structural tag) with xgrammar.

API process: `validate_structured_outputs` rejects a bad spec with ValueError before admission.
Engine process: `GrammarManager.new_state` -> `GrammarState` per request; the runner fills a
bitmask per step and `apply_bitmask` sets disallowed logits to -inf.
"""
from inferd.structured.compiler import GrammarCompiler, validate_structured_outputs
from inferd.structured.manager import GrammarManager, GrammarState, apply_bitmask
from inferd.structured.spec import GrammarSpec, build_spec

__all__ = ["GrammarCompiler", "GrammarManager", "GrammarSpec", "GrammarState", "apply_bitmask",
           "build_spec", "validate_structured_outputs"]
