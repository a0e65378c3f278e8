"""Batched sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, min_tokens.

Random rows draw with the exponential-race trick (argmax p/q, q ~ Exp(1)), which equals sampling
from p and lets each seeded request use its own torch.Generator: same seed, same tokens.
"""
from __future__ import annotations

import torch

from wideep.engine.request import Request


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _request_generator(self, req: Request) -> torch.Generator:
        if req.generator is None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.sampling_params.seed)
        return req.generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits [N, V] float32, one row per request that samples this step -> N token ids."""
        if logits.shape[0] == 0:
            return []
        return self.sample(logits, reqs).tolist()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """As __call__, but the ids stay on the device (int64 [N]): no host sync (async scheduling)."""
        vocab = logits.shape[1]
        logits = logits.float()
        self._mask_min_tokens(logits, reqs)
        greedy_ids = logits.argmax(dim=-1)
        if all(r.sampling_params.greedy for r in reqs):
            return greedy_ids

        params = [r.sampling_params for r in reqs]
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                             dtype=torch.float32, device=logits.device)
        logits = logits / temps.unsqueeze(1)
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = self._apply_top_k_top_p(logits, top_ks, top_ps)
        probs = torch.softmax(logits, dim=-1)

        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), vocab), device=probs.device).exponential_(generator=self.generator)
        for i, (p, r) in enumerate(zip(params, reqs)):
            if p.seed is not None:
                noise[i].exponential_(generator=self._request_generator(r))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy_ids, sampled)

    @staticmethod
    def _mask_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
        rows, cols = [], []
        for i, r in enumerate(reqs):
            sp = r.sampling_params
            # tokens before this one: the applied ones plus earlier steps still in flight (async)
            if r.num_output_tokens + max(r.num_pending_samples - 1, 0) < sp.min_tokens:
                banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else r.eos_token_ids)
                for t in banned:
                    if 0 <= t < logits.shape[1]:
                        rows.append(i)
                        cols.append(t)
        if rows:
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.tensor(top_ks, device=logits.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        p = torch.tensor(top_ps, dtype=torch.float32, device=logits.device).unsqueeze(1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs          # probability of strictly better tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
