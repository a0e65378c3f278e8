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
        self._batch: _Batch | None = None   # the last batch's per-row settings (decode: the same batch again)

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

    def _batch_of(self, reqs: list[Request]) -> "_Batch":
        """The batch's per-row settings, rebuilt only when the requests (or their order) changed: a
        request's sampling params are fixed, so a decode batch of the same requests reuses its lists
        and device tensors instead of walking 128 requests and copying their settings every step."""
        b = self._batch
        if b is None or b.reqs != reqs:     # identity per element (Request has no __eq__)
            b = self._batch = _Batch(list(reqs), self.device)
        return b

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """As __call__, but the ids stay on the device (int64 [N]) unless a request needs them on the
        host now: logprobs are appended to `req.pending_logprobs`, grammars advance by the token."""
        b = self._batch_of(reqs)
        logits, raw_lp, want_lp = self._process(logits, reqs)
        if b.all_greedy:
            tokens = logits.argmax(dim=-1)
        elif not b.any_greedy:
            tokens = self._draw(self._sampling_logits(logits, b), reqs)
        else:
            tokens = torch.where(b.greedy_mask(), logits.argmax(dim=-1), self._draw(self._sampling_logits(logits, b), reqs))
        if raw_lp is not None or b.grammar_rows:
            token_list = tokens.tolist()
            if raw_lp is not None:
                self._record_logprobs(raw_lp, [reqs[i] for i in want_lp], [token_list[i] for i in want_lp])
            for i in b.grammar_rows:
                reqs[i].grammar.accept(token_list[i])
        return tokens

    @torch.inference_mode()
    def distribution(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The probabilities each row is drawn from (one-hot at the argmax for greedy rows); for tests."""
        b = self._batch_of(reqs)
        logits, _, _ = self._process(logits, reqs)
        probs = torch.softmax(self._sampling_logits(logits, b), dim=-1)
        for i, p in enumerate(b.params):
            if p.greedy:
                probs[i] = torch.nn.functional.one_hot(logits[i].argmax(), logits.shape[1]).to(probs.dtype)
        return probs

    def _process(self, logits: torch.Tensor, reqs: list[Request]):
        """Steps 1-4: (processed logits, raw logprobs of the rows that want them, those rows)."""
        logits = logits.to(torch.float32, copy=True)   # transformed in place below
        b = self._batch_of(reqs)
        if b.grammar_rows:
            self._apply_grammars(logits, reqs, b.grammar_rows)
        want_lp = b.want_lp
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        # Rows whose bans could leave nothing (min_tokens vs. a grammar that must end, allowed ids vs.
        # bad words): keep their masked logits to fall back on.
        risky = [i for i in b.maybe_risky if _bans_may_leave_nothing(reqs[i])]
        fallback = logits[risky].clone() if risky else None
        if b.processor_rows:
            self._apply_processors(logits, reqs, b.processor_rows)
        if b.penalty_rows:
            self._apply_penalties(logits, reqs, b.penalty_rows)
        if fallback is not None:
            dead = torch.isneginf(logits[risky]).all(dim=-1).tolist()
            for j, i in enumerate(risky):
                if dead[j]:
                    logits[i] = fallback[j]
        return logits, raw_lp, want_lp

    # ---- 1. grammars --------------------------------------------------------------------------------
    def _apply_grammars(self, logits: torch.Tensor, reqs: list[Request], grammar_rows: list[int]) -> None:
        rows = [i for i in grammar_rows if reqs[i].grammar.constrains]
        if rows:
            self.grammar_engine.apply(logits, rows, [reqs[i].grammar for i in rows])

    # ---- 3. processors ------------------------------------------------------------------------------
    def _apply_processors(self, logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
        """rows: those with allowed ids, bad words, min_tokens or a logit bias (the rest pass through)."""
        vocab = logits.shape[1]
        dev = logits.device
        for i in rows:
            r = reqs[i]
            allowed = r.sampling_params.allowed_token_ids
            if allowed:
                keep = torch.zeros(vocab, dtype=torch.bool, device=dev)
                keep[torch.tensor([t for t in allowed if t < vocab], dtype=torch.long, device=dev)] = True
                logits[i].masked_fill_(~keep, float("-inf"))
        ban_rows, ban_cols = [], []
        bias_rows, bias_cols, bias_vals = [], [], []
        for i in rows:
            r = reqs[i]
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
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
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
    def _sampling_logits(logits: torch.Tensor, b: "_Batch") -> torch.Tensor:
        """Temperature, min_p, top-k, top-p (greedy rows pass through at temperature 1)."""
        vocab = logits.shape[1]
        logits = logits / b.temperatures()
        if b.any_min_p:
            probs = torch.softmax(logits, dim=-1)
            floor = probs.max(dim=-1, keepdim=True).values * b.min_ps()
            logits = logits.masked_fill(probs < floor, float("-inf"))
        top_k = b.top_k(vocab)
        if top_k is not None:
            logits = apply_top_k_top_p(logits, *top_k)
        return logits

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        b = self._batch_of(reqs)
        vocab = logits.shape[1]
        probs = torch.softmax(logits, dim=-1)
        unseeded = b.unseeded
        if not b.seeded:   # (no index list to copy to the device)
            noise = torch.empty((len(unseeded), vocab), device=probs.device).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if unseeded:
                noise[host_to_device(unseeded, torch.long, probs.device)] = torch.empty(
                    (len(unseeded), vocab), device=probs.device).exponential_(generator=self.generator)
        for i in b.seeded:
            noise[i].exponential_(generator=self._request_generator(reqs[i]))
        return (probs / noise).argmax(dim=-1)

    # ---- logprobs -----------------------------------------------------------------------------------
    @staticmethod
    def _record_logprobs(raw_lp: torch.Tensor, reqs: list[Request], tokens: list[int]) -> None:
        for r, entry in zip(reqs, logprob_entries(raw_lp, tokens, [r.sampling_params.logprobs for r in reqs])):
            r.pending_logprobs.append(entry)


def _bans_may_leave_nothing(r: Request) -> bool:
    sp = r.sampling_params
    return bool(sp.allowed_token_ids or sp.bad_words_token_ids or
                (r.grammar is not None and r.num_output_tokens + max(r.num_pending_samples - 1, 0) < sp.min_tokens))


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


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """k [N, 1] int64 (vocab size: no cut), p [N, 1] float32 (1.0: no cut), on the logits' device."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs          # probability of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class _Batch:
    """Per-row sampling settings of one batch of requests (their params are fixed for their lifetime):
    the row lists the transforms walk, and the settings' device tensors, made on first use."""

    def __init__(self, reqs: list[Request], device: torch.device):
        self.reqs = reqs
        self.device = device
        self.params = params = [r.sampling_params for r in reqs]
        greedy = [p.greedy for p in params]
        self.greedy = greedy
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.grammar_rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        # rows whose bans may leave nothing (Sampler._process); which of them do is decided per step
        self.maybe_risky = [i for i, r in enumerate(reqs) if r.sampling_params.allowed_token_ids
                            or r.sampling_params.bad_words_token_ids or r.grammar is not None]
        self.processor_rows = [i for i, p in enumerate(params) if p.allowed_token_ids or p.bad_words_token_ids
                               or p.min_tokens > 0 or p.logit_bias]
        self.penalty_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        self.unseeded = [i for i, p in enumerate(params) if p.seed is None]
        self.seeded = [i for i, p in enumerate(params) if p.seed is not None]
        self.any_min_p = any(p.min_p > 0 for p in params)
        self._t: dict = {}

    def _tensor(self, key, make):
        t = self._t.get(key)
        if t is None:
            t = self._t[key] = make()
        return t

    def greedy_mask(self) -> torch.Tensor:
        return self._tensor("greedy", lambda: host_to_device(self.greedy, torch.bool, self.device))

    def temperatures(self) -> torch.Tensor:
        """[N, 1]; greedy rows 1.0."""
        return self._tensor("temp", lambda: host_to_device(
            [p.temperature if p.temperature > 0 else 1.0 for p in self.params], torch.float32, self.device).unsqueeze(1))

    def min_ps(self) -> torch.Tensor:
        return self._tensor("min_p", lambda: host_to_device(
            [p.min_p for p in self.params], torch.float32, self.device).unsqueeze(1))

    def top_k(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k [N, 1], p [N, 1]) when a row cuts by top-k or top-p, else None."""
        def make():
            ks = [p.top_k if p.top_k > 0 else vocab for p in self.params]
            ps = [p.top_p for p in self.params]
            if not (any(k < vocab for k in ks) or any(p < 1.0 for p in ps)):
                return ()
            return (host_to_device(ks, torch.long, self.device).unsqueeze(1),
                    host_to_device(ps, torch.float32, self.device).unsqueeze(1))
        return self._tensor(("top", vocab), make) or None
