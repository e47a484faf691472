"""GGUF checkpoints as HF ones: config and tokenizer from metadata, weights under HF checkpoint names
in HF layouts, dequantized.

    g = GGUFModel("SmolLM2-135M-Instruct.Q4_1.gguf")     # parses and validates; GGUFError if bad
    model = get_model_class(g.hf_config.architectures)(g.hf_config, dtype=torch.bfloat16)
    model.load_weights(g.iter_weights(torch.bfloat16))

llama.cpp's converter changes some tensors on the way into GGUF; we undo each (and test it against
transformers' GGUF loader):
- llama arch: the rows of Q and K are permuted per head to interleave the rotary pairs.
- gemma3: every RMSNorm weight is stored as `w + 1` (Gemma's norm multiplies by `1 + w`).
- no `output.weight` means the LM head is tied to the embeddings.
Header parsing and validation live in `gguf_reader.py`, dequantization in `gguf_quants.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Iterator

import torch
import transformers
from gguf import GGMLQuantizationType

from inferd.models import gguf_quants
from inferd.models.gguf_reader import GGUFError, GGUFHeader, TensorInfo, read_header

__all__ = ["GGUFError", "GGUFModel", "TensorInfo", "read_header"]

RAW_BLOCK_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                   GGMLQuantizationType.Q8_0)
"""Block types the CPU decode matmuls read as they are stored."""

Transform = Callable[[torch.Tensor], torch.Tensor]

# --- architectures -----------------------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Per-layer GGUF name (between "blk.N." and ".weight"/".bias") -> HF module under model.layers.N.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_LAYER = {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_LAYER = {
    **_LAYER_NAMES, **_QK_NORM, "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class _Arch:
    hf_architecture: str
    config_class: type[transformers.PretrainedConfig]
    layer_names: dict[str, str]
    permute_qk: bool  # llama.cpp permuted Q/K rows for its interleaved RoPE
    norm_offset: float  # llama.cpp stored RMSNorm weights as w + norm_offset


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM", transformers.LlamaConfig, _LLAMA_LAYER, True, 0.0),
    "qwen2": _Arch("Qwen2ForCausalLM", transformers.Qwen2Config, _LLAMA_LAYER, False, 0.0),
    "qwen3": _Arch("Qwen3ForCausalLM", transformers.Qwen3Config, {**_LLAMA_LAYER, **_QK_NORM}, False, 0.0),
    "gemma3": _Arch("Gemma3ForCausalLM", transformers.Gemma3TextConfig, _GEMMA3_LAYER, False, 1.0),
}
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z0-9_]+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3 rope scaling, folded into the config instead

# Token texts llama.cpp treats as an end of generation when the vocabulary marks them as control.
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<EOT>", "<|end_of_text|>", "<end_of_utterance>")
_CONTROL = 3  # tokenizer.ggml.token_type of a control token
_SAMPLING_KEYS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}
# tokenizer.ggml.<key> -> the name transformers' GGUF tokenizer builders expect.
_TOKENIZER_KEYS = {
    "model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
    "token_type": "token_type", "merges": "merges", "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL_TOKENS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


class GGUFModel:
    """One GGUF checkpoint: HF config, tokenizer and HF-named weights, validated on construction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header: GGUFHeader = read_header(self.path)
        self.metadata: dict[str, Any] = self.header.metadata
        self.tensors: dict[str, TensorInfo] = self.header.tensors
        arch = self.metadata.get("general.architecture")
        if arch not in _ARCHS:
            raise GGUFError(f"{self.path}: architecture {arch!r} is not supported; "
                            f"supported: {', '.join(sorted(_ARCHS))}")
        self.arch_name: str = arch
        self.arch = _ARCHS[arch]
        self.hf_config: transformers.PretrainedConfig = self._build_config()
        self._plan = self._weight_plan()
        template = self.metadata.get("tokenizer.chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.generation_defaults: dict[str, Any] = self._generation_defaults()

    # -- typed metadata access -------------------------------------------------------------------

    def _int(self, key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 24) -> int:
        """Integer metadata, range-checked so that an absurd value fails here, not in an allocation."""
        value = self.metadata.get(key, default)
        if value is None:
            raise GGUFError(f"{self.path}: required metadata {key!r} is missing")
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value throughout (e.g. head_count_kv)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise GGUFError(f"{self.path}: metadata {key!r}={value!r} is not an integer in [{lo}, {hi}]")
        return value

    def _float(self, key: str, default: float) -> float:
        value = self.metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GGUFError(f"{self.path}: metadata {key!r}={value!r} is not a finite number")
        return float(value)

    def _token_id(self, key: str) -> int | None:
        value = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # -- config ----------------------------------------------------------------------------------

    def _build_config(self) -> transformers.PretrainedConfig:
        p = f"{self.arch_name}."
        hidden = self._int(p + "embedding_length")
        n_heads = self._int(p + "attention.head_count", hi=1 << 12)
        n_kv = self._int(p + "attention.head_count_kv", default=n_heads, hi=n_heads)
        head_dim = self._int(p + "attention.key_length", default=hidden // n_heads, hi=1 << 14)
        if n_heads % n_kv or self._int(p + "attention.value_length", default=head_dim) != head_dim:
            raise GGUFError(f"{self.path}: {n_heads} heads / {n_kv} KV heads with key length "
                            f"{head_dim} is not a layout these architectures have")
        if self._int(p + "rope.dimension_count", default=head_dim) != head_dim or head_dim % 2:
            raise GGUFError(f"{self.path}: rotary embeddings over part of a head, or over an odd "
                            f"head size ({head_dim}), are not supported")
        embed = self.tensors.get("token_embd.weight")
        if embed is None or len(embed.shape) != 2 or embed.shape[1] != hidden:
            raise GGUFError(f"{self.path}: token_embd.weight is missing or not [vocab, {hidden}]")
        kwargs: dict[str, Any] = dict(
            architectures=[self.arch.hf_architecture],
            vocab_size=embed.shape[0], hidden_size=hidden,
            intermediate_size=self._int(p + "feed_forward_length"),
            num_hidden_layers=self._int(p + "block_count", hi=1 << 12),
            num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
            max_position_embeddings=self._int(p + "context_length", hi=1 << 30),
            rms_norm_eps=self._float(p + "attention.layer_norm_rms_epsilon", 1e-6),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self._token_id("bos"), eos_token_id=self._token_id("eos"),
            pad_token_id=self._token_id("padding"),
        )
        rope = self._rope_parameters(head_dim)
        if self.arch_name == "gemma3":
            kwargs.update(self._gemma3_kwargs(kwargs, rope))
        else:
            kwargs["rope_parameters"] = rope
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
            if self.arch_name == "llama":
                kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in self.tensors
        try:
            return self.arch.config_class(**kwargs)
        except (ValueError, TypeError) as e:  # transformers' own config validation
            raise GGUFError(f"{self.path}: metadata gives an invalid {self.arch.hf_architecture} "
                            f"config: {e}") from None

    def _rope_parameters(self, head_dim: int) -> dict[str, Any]:
        """transformers' `rope_parameters` from `rope.freq_base` and `rope.scaling.*`."""
        p = f"{self.arch_name}.rope."
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self._float(p + "freq_base", 10000.0)}
        kind = self.metadata.get(p + "scaling.type", "none")
        if kind in ("linear", "yarn"):
            rope.update(rope_type=kind, factor=self._float(p + "scaling.factor", 1.0))
            if kind == "yarn":
                rope["original_max_position_embeddings"] = self._int(p + "scaling.original_context_length",
                                                                     hi=1 << 30)
        elif kind != "none":
            raise GGUFError(f"{self.path}: rope scaling {kind!r} is not supported")
        if _ROPE_FREQS in self.tensors:
            rope.update(self._llama3_rope(rope["rope_theta"], head_dim))
        return rope

    def _llama3_rope(self, theta: float, head_dim: int) -> dict[str, Any]:
        """Recover Llama 3's rope scaling from the per-frequency factors llama.cpp stores instead.

        The file keeps only the factor vector; we find the (factor, low, high, original context)
        that reproduce it among the values Llama 3.x ships, and refuse a vector we cannot explain
        rather than run with the wrong positions.
        """
        info = self.tensors[_ROPE_FREQS]
        if info.shape != (head_dim // 2,):
            raise GGUFError(f"{self.path}: {_ROPE_FREQS} has shape {list(info.shape)}, "
                            f"expected [{head_dim // 2}]")
        with open(self.path, "rb") as f:
            stored = self._read_tensor(info, f).float()
        if torch.all(stored == 1):
            return {}
        factor = float(stored.max())
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        wavelen = 2 * math.pi / inv_freq
        for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 2.0, 8192)):
            smooth = (original / wavelen - low) / (high - low)
            expect = torch.where(wavelen < original / high, 1.0, torch.where(
                wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if torch.allclose(expect.float(), stored, rtol=1e-3, atol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
        raise GGUFError(f"{self.path}: cannot recover the rope scaling behind {_ROPE_FREQS}")

    def _gemma3_kwargs(self, kwargs: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
        """Gemma 3 settings llama.cpp keeps as constants rather than metadata (llama-model.cpp)."""
        p = "gemma3."
        n_layers = kwargs["num_hidden_layers"]
        pattern = self._int(p + "attention.sliding_window_pattern", default=6, hi=1 << 12)
        # Every `pattern`-th layer attends globally; the others use a sliding window with rope base
        # 10000 (llama.cpp: rope_freq_base_train_swa), while global layers take freq_base + scaling.
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(n_layers)]
        # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(hidden/heads).
        head_dim, hidden, n_heads = kwargs["head_dim"], kwargs["hidden_size"], kwargs["num_attention_heads"]
        scalar = hidden // n_heads if n_layers == 62 else head_dim
        extra = dict(
            layer_types=layer_types, sliding_window=self._int(p + "attention.sliding_window", hi=1 << 30),
            query_pre_attn_scalar=scalar,
            rope_parameters={"full_attention": rope,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        )
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if p + key in self.metadata:
                extra[key] = self._float(p + key, 0.0)
        return extra

    # -- weights ---------------------------------------------------------------------------------

    def _weight_plan(self) -> list[tuple[TensorInfo, str, Transform]]:
        """(tensor, HF name, transform) for every tensor. An unknown name, a shape that disagrees with
        the config, or a missing weight fails here, before any tensor is read."""
        n_layers, expected, plan = self.hf_config.num_hidden_layers, self._expected_shapes(), []
        for info in self.tensors.values():
            if info.name == _ROPE_FREQS:
                continue
            m = _TENSOR_NAME.match(info.name)
            layer, short, suffix = m.groups() if m else (None, "", "")
            names = _GLOBAL_NAMES if layer is None else self.arch.layer_names
            if short not in names or (layer is not None and int(layer) >= n_layers):
                raise GGUFError(f"{self.path}: tensor {info.name!r} has no counterpart in a "
                                f"{n_layers}-layer {self.arch.hf_architecture}")
            want = expected[short] if suffix == "weight" else expected[short][:1]
            if info.shape != want:
                raise GGUFError(f"{self.path}: tensor {info.name!r} has shape {list(info.shape)}, "
                                f"the config implies {list(want)}")
            prefix = "" if layer is None else f"model.layers.{int(layer)}."
            plan.append((info, f"{prefix}{names[short]}.{suffix}", self._transform_for(short, suffix)))
        required = [f"{g}.weight" for g in ("token_embd", "output_norm")] + [
            f"blk.{i}.{short}.weight" for i in range(n_layers) for short in self.arch.layer_names]
        if missing := [name for name in required if name not in self.tensors]:
            raise GGUFError(f"{self.path}: {len(missing)} weights are missing, e.g. {missing[:3]}")
        return plan

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shape (torch order) of each GGUF tensor kind under this config; a bias is [rows]."""
        c = self.hf_config
        hidden, q_rows, kv_rows = (c.hidden_size, c.num_attention_heads * c.head_dim,
                                   c.num_key_value_heads * c.head_dim)
        shapes = {"token_embd": (c.vocab_size, hidden), "output": (c.vocab_size, hidden),
                  "attn_q": (q_rows, hidden), "attn_k": (kv_rows, hidden), "attn_v": (kv_rows, hidden),
                  "attn_output": (hidden, q_rows), "ffn_gate": (c.intermediate_size, hidden),
                  "ffn_up": (c.intermediate_size, hidden), "ffn_down": (hidden, c.intermediate_size),
                  "attn_q_norm": (c.head_dim,), "attn_k_norm": (c.head_dim,)}
        # Every other kind is an RMSNorm over the hidden size.
        return {short: shapes.get(short, (hidden,)) for short in (*_GLOBAL_NAMES, *self.arch.layer_names)}

    def _transform_for(self, short: str, suffix: str) -> Transform:
        cfg = self.hf_config
        if self.arch.permute_qk and short in ("attn_q", "attn_k"):
            n_heads = cfg.num_attention_heads if short == "attn_q" else cfg.num_key_value_heads
            return lambda w: _unpermute_rows(w, n_heads)
        if self.arch.norm_offset and short.endswith("norm") and suffix == "weight":
            offset = self.arch.norm_offset
            return lambda w: w.float() - offset  # in fp32, as transformers does, before the cast
        return lambda w: w

    def _read_raw(self, info: TensorInfo, f: BinaryIO) -> torch.Tensor:
        """One tensor's bytes as stored (uint8 [n_bytes]), at the offset validation checked."""
        raw = torch.empty(info.n_bytes, dtype=torch.uint8)
        f.seek(info.offset)
        if f.readinto(raw.numpy()) != info.n_bytes:  # the file shrank since validation
            raise GGUFError(f"{self.path}: short read of tensor {info.name!r}")
        return raw

    def _read_tensor(self, info: TensorInfo, f: BinaryIO) -> torch.Tensor:
        """One tensor's values in its ggml layout (torch-ordered shape): float32, or F16/BF16 as stored."""
        raw = self._read_raw(info, f)
        return gguf_quants.dequantize(raw, info.qtype, info.n_elements).reshape(info.shape)

    def iter_weights(self, dtype: torch.dtype = torch.float32,
                     names: Collection[str] | None = None,
                     raw_blocks: dict[str, tuple[GGMLQuantizationType, torch.Tensor]] | None = None,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, dequantized tensor in `dtype`), one tensor at a time, in file order.

        `names` limits it to those HF names (a partial load or a spot check). Tied embeddings (no
        `output.weight`) yield no `lm_head.weight`, as an HF checkpoint with `tie_word_embeddings`
        does not. With `raw_blocks`, every 2-D Q4_0/Q4_1/Q8_0 weight also lands there
        undequantized, as (type, blocks uint8 [rows, K / 32, type_size]) in HF row order: the
        CPU's decode matmuls read those blocks directly (`quant.attach_gguf_blocks`).
        """
        with open(self.path, "rb") as f:
            for info, hf_name, transform in self._plan:
                if names is not None and hf_name not in names:
                    continue
                with gguf_quants.single_threaded():
                    raw = self._read_raw(info, f)
                    weight = gguf_quants.dequantize(raw, info.qtype, info.n_elements)
                    weight = transform(weight.reshape(info.shape)).to(dtype).contiguous()
                if raw_blocks is not None and info.qtype in RAW_BLOCK_TYPES and len(info.shape) == 2:
                    rows, k = info.shape
                    blocks = raw.view(rows, k // 32, -1)
                    raw_blocks[hf_name] = (info.qtype, transform(blocks).contiguous())
                yield hf_name, weight  # outside the `with`: the consumer runs on the usual threads

    def weight_names(self) -> dict[str, str]:
        """GGUF tensor name -> HF name, for every weight `iter_weights` yields."""
        return {info.name: hf_name for info, hf_name, _ in self._plan}

    # -- tokenizer and generation ----------------------------------------------------------------

    def tokenizer(self) -> transformers.PreTrainedTokenizerFast:
        """A fast tokenizer rebuilt from the vocabulary/merges in the metadata (via transformers'
        GGUF tokenizer builders), with the file's special tokens, BOS flag and chat template."""
        meta = self.metadata
        spec = {name: meta[f"tokenizer.ggml.{key}"] for key, name in _TOKENIZER_KEYS.items()
                if f"tokenizer.ggml.{key}" in meta}
        tokens = spec.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise GGUFError(f"{self.path}: tokenizer.ggml.tokens is missing or not a list of strings")
        try:
            from transformers.integrations.gguf import convert_gguf_tokenizer
        except ImportError:  # transformers 4.x kept it here
            from transformers.integrations.ggml import convert_gguf_tokenizer
        try:
            backend, extra = convert_gguf_tokenizer(self.arch_name, spec)
        except Exception as e:  # noqa: BLE001 - untrusted vocab into a third-party builder (the Rust
            # side raises bare Exceptions); whatever it refuses is a bad file, reported as one.
            raise GGUFError(f"{self.path}: cannot build the tokenizer: {e}") from None
        kwargs: dict[str, Any] = dict(extra, tokenizer_object=backend, chat_template=self.chat_template)
        for name, key in _SPECIAL_TOKENS.items():
            token_id = self._token_id(key)
            if token_id is not None and 0 <= token_id < len(tokens):
                kwargs[name] = tokens[token_id]
        # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama")
        kwargs["add_bos_token"] = bool(add_bos) and "bos_token" in kwargs
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        kwargs["add_eos_token"] = bool(add_eos) and "eos_token" in kwargs
        return transformers.PreTrainedTokenizerFast(**kwargs)

    def _generation_defaults(self) -> dict[str, Any]:
        """generation_config.json-style: special token ids, and the sampling settings llama.cpp
        writes as `general.sampling.*` when the file has them."""
        out: dict[str, Any] = {}
        for key, name in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
            if (token_id := self._token_id(key)) is not None:
                out[name] = token_id
        if eos := self.stop_token_ids():
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        for gguf_key, hf_key in _SAMPLING_KEYS.items():
            value = self.metadata.get(f"general.sampling.{gguf_key}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[hf_key] = value
        return out

    def stop_token_ids(self) -> list[int]:
        """eos/eot/eom ids from the metadata, then each control token llama.cpp also treats as an
        end of generation (e.g. Gemma's `<end_of_turn>`, which the file does not name as eos)."""
        ids = [i for key in ("eos", "eot", "eom") if (i := self._token_id(key)) is not None]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        types = self.metadata.get("tokenizer.ggml.token_type")
        if isinstance(tokens, list) and isinstance(types, list) and len(tokens) == len(types):
            index = {t: i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
            ids += [i for i in index.values() if types[i] == _CONTROL]
        return list(dict.fromkeys(ids))


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF orders each head's rows as (first half, second half) of the rotary pairs; llama.cpp
    interleaves them for its RoPE kernel: rows (H, 2, D/2) -> (H, D/2, 2). This swaps them back.
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
