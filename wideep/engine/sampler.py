"""Batched sampling on the device, in vLLM's order of transforms:

1. grammar masks (structured output: tokens the request's grammar forbids next)
2. raw logprobs (log_softmax of these logits: what `logprobs` / `top_logprobs` report)
3. allowed_token_ids, bad_words, min_tokens (stop/EOS banned), logit_bias
4. repetition (prompt + output), frequency and presence (output) penalties
5. greedy rows take the argmax here; the rest: temperature, min_p, top-k, top-p, then a draw.

Random rows draw with the exponential-race trick (argmax p/q, q ~ Exp(1)), which equals sampling
from p and lets each seeded request use its own torch.Generator: same seed, same tokens.
The sampler runs eagerly after the forward (CUDA graphs capture the model's forward only), so its
per-request inputs may change shape freely from step to step.
"""
from __future__ import annotations

import torch

from wideep.engine.request import Request
from wideep.utils.device import host_to_device

_LOGPROB_FLOOR = -9999.0   # what -inf (a masked token) is reported as, as vLLM does


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.grammar_engine = None   # set by the engine once a constrained request arrives

    def _request_generator(self, req: Request) -> torch.Generator:
        if req.generator is None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.sampling_params.seed)
        return req.generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits [N, V], one row per request that samples this step -> N token ids."""
        if logits.shape[0] == 0:
            return []
        return self.sample(logits, reqs).tolist()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """As __call__, but the ids stay on the device (int64 [N]) unless a request needs them on the
        host now: logprobs are appended to `req.pending_logprobs`, grammars advance by the token."""
        params = [r.sampling_params for r in reqs]
        logits, raw_lp, want_lp = self._process(logits, reqs)
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        elif not any(greedy):
            tokens = self._draw(self._sampling_logits(logits, params), reqs)
        else:
            tokens = torch.where(host_to_device(greedy, torch.bool, logits.device),
                                 logits.argmax(dim=-1), self._draw(self._sampling_logits(logits, params), reqs))
        if raw_lp is not None or any(r.grammar is not None for r in reqs):
            token_list = tokens.tolist()
            if raw_lp is not None:
                self._record_logprobs(raw_lp, [reqs[i] for i in want_lp], [token_list[i] for i in want_lp])
            for r, t in zip(reqs, token_list):
                if r.grammar is not None:
                    r.grammar.accept(t)
        return tokens

    @torch.inference_mode()
    def distribution(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The probabilities each row is drawn from (one-hot at the argmax for greedy rows); for tests."""
        params = [r.sampling_params for r in reqs]
        logits, _, _ = self._process(logits, reqs)
        probs = torch.softmax(self._sampling_logits(logits, params), dim=-1)
        for i, p in enumerate(params):
            if p.greedy:
                probs[i] = torch.nn.functional.one_hot(logits[i].argmax(), logits.shape[1]).to(probs.dtype)
        return probs

    def _process(self, logits: torch.Tensor, reqs: list[Request]):
        """Steps 1-4: (processed logits, raw logprobs of the rows that want them, those rows)."""
        logits = logits.to(torch.float32, copy=True)   # transformed in place below
        params = [r.sampling_params for r in reqs]
        self._apply_grammars(logits, reqs)
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        # Rows whose bans could leave nothing (min_tokens vs. a grammar that must end, allowed ids vs.
        # bad words): keep their masked logits to fall back on.
        risky = [i for i, r in enumerate(reqs) if r.sampling_params.allowed_token_ids or
                 r.sampling_params.bad_words_token_ids or
                 (r.grammar is not None and r.num_output_tokens + max(r.num_pending_samples - 1, 0)
                  < r.sampling_params.min_tokens)]
        fallback = logits[risky].clone() if risky else None
        self._apply_processors(logits, reqs)
        self._apply_penalties(logits, reqs)
        if fallback is not None:
            dead = torch.isneginf(logits[risky]).all(dim=-1).tolist()
            for j, i in enumerate(risky):
                if dead[j]:
                    logits[i] = fallback[j]
        return logits, raw_lp, want_lp

    # ---- 1. grammars --------------------------------------------------------------------------------
    def _apply_grammars(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and r.grammar.constrains]
        if rows:
            self.grammar_engine.apply(logits, rows, [reqs[i].grammar for i in rows])

    # ---- 3. processors ------------------------------------------------------------------------------
    def _apply_processors(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        vocab = logits.shape[1]
        dev = logits.device
        for i, r in enumerate(reqs):
            allowed = r.sampling_params.allowed_token_ids
            if allowed:
                keep = torch.zeros(vocab, dtype=torch.bool, device=dev)
                keep[torch.tensor([t for t in allowed if t < vocab], dtype=torch.long, device=dev)] = True
                logits[i].masked_fill_(~keep, float("-inf"))
        ban_rows, ban_cols = [], []
        bias_rows, bias_cols, bias_vals = [], [], []
        for i, r in enumerate(reqs):
            sp = r.sampling_params
            if sp.bad_words_token_ids:
                out = r.all_token_ids[r.num_prompt_tokens:]
                for word in sp.bad_words_token_ids:
                    prefix = word[:-1]
                    if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix):
                        ban_rows.append(i)
                        ban_cols.append(word[-1])
            # tokens before this one: the applied ones plus earlier steps still in flight (async)
            if r.num_output_tokens + max(r.num_pending_samples - 1, 0) < sp.min_tokens:
                for t in set(sp.stop_token_ids) | (set() if sp.ignore_eos else r.eos_token_ids):
                    ban_rows.append(i)
                    ban_cols.append(t)
            for t, b in sp.logit_bias.items():
                bias_rows.append(i)
                bias_cols.append(t)
                bias_vals.append(b)
        keep = [(a, b) for a, b in zip(ban_rows, ban_cols) if 0 <= b < vocab]
        if keep:
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            logits[idx[:, 0], idx[:, 1]] = float("-inf")
        if bias_rows:
            rows = torch.tensor(bias_rows, dtype=torch.long, device=dev)
            cols = torch.tensor(bias_cols, dtype=torch.long, device=dev)
            logits.index_put_((rows, cols), torch.tensor(bias_vals, dtype=logits.dtype, device=dev), accumulate=True)

    # ---- 4. penalties -------------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
        rows = [i for i, r in enumerate(reqs) if r.sampling_params.needs_penalties]
        if not rows:
            return
        dev, vocab = logits.device, logits.shape[1]
        counts = torch.zeros((len(rows), vocab), dtype=logits.dtype, device=dev)
        in_prompt = torch.zeros((len(rows), vocab), dtype=torch.bool, device=dev)
        out_r, out_t, pr_r, pr_t = [], [], [], []
        for j, i in enumerate(rows):
            r = reqs[i]
            out = r.all_token_ids[r.num_prompt_tokens:]
            out_r.extend([j] * len(out))
            out_t.extend(out)
            pr_r.extend([j] * r.num_prompt_tokens)
            pr_t.extend(r.prompt_token_ids)
        if out_t:
            counts.index_put_((torch.tensor(out_r, device=dev), torch.tensor(out_t, device=dev)),
                              torch.ones(len(out_t), dtype=logits.dtype, device=dev), accumulate=True)
        if pr_t:
            in_prompt[torch.tensor(pr_r, device=dev), torch.tensor(pr_t, device=dev)] = True
        sps = [reqs[i].sampling_params for i in rows]
        rep = torch.tensor([p.repetition_penalty for p in sps], dtype=logits.dtype, device=dev).unsqueeze(1)
        freq = torch.tensor([p.frequency_penalty for p in sps], dtype=logits.dtype, device=dev).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in sps], dtype=logits.dtype, device=dev).unsqueeze(1)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        sub = logits[idx]
        seen = in_prompt | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        logits[idx] = sub

    # ---- 5. random rows -----------------------------------------------------------------------------
    @staticmethod
    def _sampling_logits(logits: torch.Tensor, params: list) -> torch.Tensor:
        """Temperature, min_p, top-k, top-p (greedy rows pass through at temperature 1)."""
        vocab = logits.shape[1]
        temps = host_to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32,
                               logits.device)
        logits = logits / temps.unsqueeze(1)
        min_ps = [p.min_p for p in params]
        if any(m > 0 for m in min_ps):
            probs = torch.softmax(logits, dim=-1)
            floor = probs.max(dim=-1, keepdim=True).values * host_to_device(min_ps, torch.float32,
                                                                            logits.device).unsqueeze(1)
            logits = logits.masked_fill(probs < floor, float("-inf"))
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = apply_top_k_top_p(logits, top_ks, top_ps)
        return logits

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        vocab = logits.shape[1]
        probs = torch.softmax(logits, dim=-1)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if len(unseeded) == len(params):   # (no index list to copy to the device)
            noise = torch.empty((len(unseeded), vocab), device=probs.device).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if unseeded:
                noise[host_to_device(unseeded, torch.long, probs.device)] = torch.empty(
                    (len(unseeded), vocab), device=probs.device).exponential_(generator=self.generator)
        for i, (p, r) in enumerate(zip(params, reqs)):
            if p.seed is not None:
                noise[i].exponential_(generator=self._request_generator(r))
        return (probs / noise).argmax(dim=-1)

    # ---- logprobs -----------------------------------------------------------------------------------
    @staticmethod
    def _record_logprobs(raw_lp: torch.Tensor, reqs: list[Request], tokens: list[int]) -> None:
        for r, entry in zip(reqs, logprob_entries(raw_lp, tokens, [r.sampling_params.logprobs for r in reqs])):
            r.pending_logprobs.append(entry)


def logprob_entries(logprobs: torch.Tensor, tokens: list[int], ks: list[int]) -> list[list]:
    """Per row: [logprob of tokens[i], its rank (1 = most likely), top-k ids, top-k logprobs]."""
    vocab = logprobs.shape[1]
    ks = [vocab if k == -1 else min(k, vocab) for k in ks]
    tok = torch.tensor(tokens, dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, tok)
    ranks = (logprobs > chosen).sum(dim=1) + 1
    kmax = max(ks)
    if kmax > 0:
        top_v, top_i = logprobs.topk(kmax, dim=-1)
        top_v, top_i = top_v.clamp_min(_LOGPROB_FLOOR).tolist(), top_i.tolist()
    chosen_l = chosen.squeeze(1).clamp_min(_LOGPROB_FLOOR).tolist()
    ranks_l = ranks.tolist()
    out = []
    for i, k in enumerate(ks):
        out.append([chosen_l[i], ranks_l[i], top_i[i][:k] if k else [], top_v[i][:k] if k else []])
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = host_to_device(top_ks, torch.long, logits.device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    p = host_to_device(top_ps, torch.float32, logits.device).unsqueeze(1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs          # probability of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
