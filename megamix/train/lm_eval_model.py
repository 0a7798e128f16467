"""A megamix model in memory as an lm-evaluation-harness ``LM``: what the in-loop downstream evals
(:mod:`megamix.train.downstream`) hand to ``lm_eval.simple_evaluate``.

It scores exactly as lm-eval's ``--model hf`` scores an export (``megamix lm-eval``): texts are
encoded without special tokens; a continuation is scored in the last ``max_length`` positions of
context + continuation; ``loglikelihood_rolling`` scores a document in lm-eval's disjoint windows of
``max_length`` predictions, its first token conditioned on the prefix token (the export
tokenizer's BOS, else EOS: for a SentencePiece tokenizer megamix exports EOS as BOS, the token every
document follows in the corpus).  Log-probabilities are taken in float64.  ``generate_until`` decodes
greedily (no cache: for the short generations of offline tasks).

Imports lm-eval at import time: import this module only when downstream evals are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from megamix.data.tokenizer import SentencePieceTokenizer, Tokenizer


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token a document's first token is conditioned on, as in an export's lm-eval run."""
    if isinstance(tokenizer, SentencePieceTokenizer) or tokenizer.bos_id is None:
        prefix = tokenizer.eos_id
    else:
        prefix = tokenizer.bos_id
    if prefix is None:
        raise ValueError(f"{tokenizer.name}: the tokenizer has neither BOS nor EOS to start a document with")
    return prefix


class MegamixLM(TemplateLM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_length: int, batch_size: int,
                 device: torch.device):
        super().__init__()
        self.model, self.tok, self._max_length = model, tokenizer, max_length
        self.batch_size, self._device = batch_size, device
        self.prefix = prefix_token(tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.prefix

    @property
    def prefix_token_id(self) -> int:
        return self.prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits ``[rows, longest, vocab]`` of right-padded rows (causal: padding changes nothing before it)."""
        tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        return self.model(tokens.to(self._device)).float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for first in range(0, len(requests), self.batch_size):
            batch = requests[first: first + self.batch_size]
            inputs, targets = [], []
            for _, context, continuation in batch:
                whole = (context + continuation)[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                targets.append(whole[len(whole) - min(len(continuation), len(whole) - 1):])
            logits = self._logits(inputs)
            for i, (request, target) in enumerate(zip(batch, targets)):
                end = len(inputs[i])
                logprobs = F.log_softmax(logits[i, end - len(target): end].double(), dim=-1)
                target_ids = torch.tensor(target, device=logprobs.device)
                answer = (float(logprobs.gather(-1, target_ids[:, None]).sum()),
                          bool((logprobs.argmax(-1) == target_ids).all()))
                if request[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", request[0], answer)
                results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context) or [self.prefix]
            generated: list[int] = []
            text = ""
            for _ in range(int(kwargs.get("max_gen_toks", 256))):
                logits = self._logits([(ids + generated)[-self.max_length:]])
                token = int(logits[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out
