"""The sampler: logits [B, V] -> one token id per row, plus logprobs when asked.

Steps, in order (each is skipped when no row in the batch needs it):

 1. raw logprobs: log_softmax of the model's logits, before any processing (vLLM's default
    `raw_logprobs`), computed only when some request asked for logprobs;
 2. allowed tokens: `allowed_token_ids`, then the engine's structured-output mask;
 3. logit_bias;
 4. bad_words: a word's last token is banned when the output so far ends with the word's
    preceding tokens;
 5. min_tokens: stop_token_ids (and EOS unless ignore_eos) are banned until min_tokens
    outputs exist. (ignore_eos itself is the engine's stop check, not a sampler step.);
 6. penalties: repetition (prompt + output), then frequency and presence (output);
 7. greedy rows: argmax of the logits so far -- the steps below cannot change a row's argmax;
 8. temperature;
 9. min_p;
10. top_k, then top_p (one topk or one sort per step, only when some row uses them);
11. random rows: exponential race on softmax, noise from the request's own generator when
    it has one; greedy rows take their argmax from step 7.

Invariant: a banned or disallowed token has logit -inf from the step that bans it on, and
every later step keeps -inf at -inf, so steps 2-5 commute.

The sampler consumes `logits`: it modifies the tensor in place rather than copy [B, V] per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferd.sample import ops
from inferd.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # Present when some row asked for logprobs; rows that asked for fewer than
    # max_num_logprobs slice their first k+1 columns.
    logprob_token_ids: torch.Tensor | None = None  # [B, k+1]: column 0 = sampled, then top-k
    logprobs: torch.Tensor | None = None  # [B, k+1] float32, raw model distribution
    sampled_ranks: torch.Tensor | None = None  # [B] int64, rank of the sampled token (1 = top)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)
        logits = self.process_logits(logits, meta)
        sampled = self.sample(logits, meta)
        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        ids, lps, ranks = ops.gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)

    @staticmethod
    def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Steps 2-6: the request-level edits every row gets, greedy or not."""
        if meta.allowed_ids_mask is not None:
            ops.apply_allowed_mask(logits, meta.allowed_ids_mask)
        if meta.allowed_token_mask is not None:
            ops.apply_allowed_mask(logits, meta.allowed_token_mask)
        if meta.logit_bias is not None:
            ops.apply_logit_bias(logits, *meta.logit_bias)
        if meta.bad_words_banned is not None:
            ops.apply_token_bans(logits, *meta.bad_words_banned)
        if meta.min_tokens_banned is not None:
            ops.apply_token_bans(logits, *meta.min_tokens_banned)
        if meta.any_penalties:
            ops.apply_penalties(logits, meta.vocab_size, meta.output_token_ids,
                                meta.prompt_token_ids, meta.repetition_penalties,
                                meta.frequency_penalties, meta.presence_penalties)
        return logits

    @staticmethod
    def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Steps 7-11."""
        greedy = None if meta.all_random else ops.argmax(logits)
        if meta.all_greedy:
            return greedy
        ops.apply_temperature(logits, meta.temperature)
        if meta.min_p is not None:
            ops.apply_min_p(logits, meta.min_p)
        ops.apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
        sampled = ops.random_sample(logits, meta.generators)
        if greedy is None:
            return sampled
        return torch.where(meta.greedy_mask, greedy, sampled)
