"""Structured output: a request's constraint (JSON schema, any JSON object, regex, choice, EBNF grammar)
and its enforcement with the xgrammar grammar engine, one matcher per request, batched per step.

xgrammar is optional (the `structured` extra): without it every constrained request is a 400 that
says so, and nothing else changes. The engine builds one `GrammarEngine` per process from the model
directory's tokenizer.json (each token id -> the bytes it stands for) the first time a constrained
request arrives; compiled grammars are cached by the engine, so repeated schemas compile once.

`start_after_token_id` lets a reasoning model think freely: the constraint starts with the token after
the first time that id (e.g. `</think>`) is generated.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Keywords a JSON schema may use that the grammar engine cannot enforce: accepting them would
# silently produce output that does not validate, so they are a 400 instead.
_UNSUPPORTED_SCHEMA_KEYS = ("if", "then", "else", "not", "dependentSchemas", "dependentRequired",
                            "patternProperties", "propertyNames", "contains", "unevaluatedItems",
                            "multipleOf", "uniqueItems")


_CACHE_SIZE = 256          # compiled grammars kept per engine
# The grammar engine spells a negated character class as any UTF-8 sequence of a code point outside it,
# surrogates (U+D800-U+DFFF, bytes ED A0 80-ED BF BF) included; those bytes are not UTF-8, so they decode
# to three U+FFFD each and break the schema's lengths. JSON string characters exclude them.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_UNBOUNDED_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'


class GrammarUnavailable(RuntimeError):
    """The grammar engine (xgrammar) is not installed in this process."""


@dataclass
class StructuredOutputsParams:
    """Exactly one of json / json_object / regex / choice / grammar."""

    json: dict | str | None = None          # a JSON schema (object or its JSON text)
    json_object: bool = False               # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None              # EBNF (GBNF-style, as xgrammar and vLLM take it)
    start_after_token_id: int | None = None  # constrain only after this token has been generated

    def kind(self) -> str:
        set_ = [k for k in _KINDS if (getattr(self, k) not in (None, False))]
        if len(set_) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(set_) or 'none'}")
        return set_[0]

    def validate(self) -> None:
        """A ValueError with a message fit for a 400 when the constraint cannot be honored."""
        kind = self.kind()
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            bad = _find_unsupported(schema)
            if bad:
                raise ValueError(f"unsupported JSON schema: keyword {bad!r} cannot be enforced by the grammar engine")
        elif kind == "regex" and not isinstance(self.regex, str):
            raise ValueError("regex must be a string")
        elif kind == "choice":
            if not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("choice must be a non-empty list of strings")
        elif kind == "grammar" and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("grammar must be a non-empty EBNF string")
        if self.start_after_token_id is not None and (
                not isinstance(self.start_after_token_id, int) or self.start_after_token_id < 0):
            raise ValueError("start_after_token_id must be a non-negative token id")

    def cache_key(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("start_after_token_id")
        return json.dumps(d, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructuredOutputsParams":
        return cls(**d)


def _find_unsupported(schema: Any) -> str | None:
    if isinstance(schema, dict):
        for k in _UNSUPPORTED_SCHEMA_KEYS:
            if k in schema:
                return k
        for v in schema.values():
            bad = _find_unsupported(v)
            if bad:
                return bad
    elif isinstance(schema, list):
        for v in schema:
            bad = _find_unsupported(v)
            if bad:
                return bad
    return None


def grammar_engine_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _vocab_type(decoder: dict | None, xgr) -> Any:
    """How tokenizer.json's token strings map to bytes: byte-level BPE (DeepSeek, GPT-2 style) or
    SentencePiece byte fallback; other decoders (e.g. word-joining ones) have no fixed token bytes."""
    def types(d: dict | None) -> list[str]:
        if not d:
            return []
        if d.get("type") == "Sequence":
            return [t for sub in d.get("decoders", []) for t in types(sub)]
        return [d.get("type")]

    kinds = types(decoder)
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    raise ValueError(f"the model's tokenizer decoder ({'+'.join(kinds) or 'none'}) does not map each token "
                     "to fixed bytes, so a grammar cannot be enforced on it")


class GrammarEngine:
    """One per engine process: token table, compiler with its cache, and batched bitmask filling."""

    def __init__(self, info):
        """`info`: an xgrammar TokenizerInfo (see from_model_dir)."""
        import xgrammar as xgr

        self.xgr = xgr
        self.info = info
        self.vocab_size = info.vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)
        self._compiled: OrderedDict[str, Any] = OrderedDict()   # constraint -> CompiledGrammar (LRU)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, vocab_size: int, stop_token_ids: set[int]) -> "GrammarEngine":
        """Token id -> bytes from the model directory's tokenizer.json."""
        try:
            import xgrammar as xgr
        except ImportError:
            raise GrammarUnavailable("structured output needs the grammar engine xgrammar, which is not installed "
                                     "on this server (pip install 'wideep[structured]')") from None
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"structured output needs the model's tokenizer.json ({path} not found)")
        spec = json.loads(path.read_text())
        vocab_type = _vocab_type(spec.get("decoder"), xgr)
        vocab = HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        encoded = [""] * max(max(vocab.values()) + 1, 1)
        for s, i in vocab.items():
            encoded[i] = "" if s in special else s   # special tokens never match grammar text
        info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=max(vocab_size, len(encoded)),
                                 stop_token_ids=sorted(stop_token_ids) or None)
        return cls(info)

    def compile(self, p: StructuredOutputsParams):
        """A compiled grammar (cached: the same schema compiles once); ValueError (-> 400) when the
        engine rejects the constraint."""
        key = p.cache_key()
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        compiled = self._compile(p)
        self._compiled[key] = compiled
        if len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    def _compile(self, p: StructuredOutputsParams):
        kind = p.kind()
        c = self.compiler
        try:
            if kind == "json":
                return c.compile_grammar(self._json_grammar(p.json if isinstance(p.json, str) else json.dumps(p.json), True))
            if kind == "json_object":
                return c.compile_grammar(self._json_grammar('{"type": "object"}', False))
            if kind == "regex":
                return c.compile_regex(p.regex)
            if kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in p.choice))
            return c.compile_grammar(p.grammar)
        except Exception as e:  # xgrammar's parse/convert errors: a 400, never a crash of the engine loop
            what = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[kind]
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"unsupported {what}: {msg}") from None

    def _json_grammar(self, schema: str, strict: bool) -> str:
        """The schema's grammar (compact separators; strict: no properties beyond the schema's) as EBNF,
        with control characters kept out of length-bounded strings, which xgrammar's own rule lets in
        (raw control characters are not valid JSON), and surrogates kept out of every string."""
        g = str(self.xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
        return g.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR).replace(_UNBOUNDED_STRING_CHAR, _JSON_STRING_CHAR)

    def matcher(self, p: StructuredOutputsParams) -> "RequestGrammar":
        return RequestGrammar(self.xgr.GrammarMatcher(self.compile(p)), p.start_after_token_id)

    def apply(self, logits: "torch.Tensor", rows: list[int], grammars: list["RequestGrammar"]) -> None:
        """Masks, in place, every token each grammar forbids next (rows of `logits`, batched)."""
        if not rows:
            return
        self.mask(logits, rows, self.fill(grammars))

    def fill(self, grammars: list["RequestGrammar"]):
        """[len(grammars), ceil(V/32)] int32 bitmask of the tokens each grammar allows next (CPU)."""
        bitmask = self.xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
        return bitmask

    def mask(self, logits: "torch.Tensor", rows: list[int], bitmask) -> None:
        """-inf, in place, at every token of logits[rows[i]] that bitmask row i forbids."""
        import torch

        vocab = logits.shape[1]
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        bitmask = bitmask.to(logits.device, non_blocking=True)
        if logits.device.type == "cuda":   # xgrammar's kernel, on the gathered rows
            sub = logits[idx]
            self.xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=vocab)
            logits[idx] = sub
            return
        # CPU: numpy unpacks the bits (little-endian words: bit i of word w is token 32w + i) far faster
        # than xgrammar's CPU kernel or torch shifts; then one masked fill.
        import numpy as np

        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
        banned = ~torch.from_numpy(bits)[:, :vocab].view(torch.bool)
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(banned, float("-inf"))
        else:
            logits[idx] = logits[idx].masked_fill_(banned, float("-inf"))


class RequestGrammar:
    """One request's grammar state; advanced with every token the request generates."""

    def __init__(self, matcher, start_after_token_id: int | None):
        self.matcher = matcher
        self.start_after = start_after_token_id
        self.active = start_after_token_id is None
        self.failed = False

    def accept(self, token_id: int) -> None:
        if not self.active:
            if token_id == self.start_after:
                self.active = True
            return
        if self.failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            self.failed = True    # cannot happen when the mask was applied; kept so nothing crashes

    @property
    def terminated(self) -> bool:
        """The grammar is complete and has accepted its stop token."""
        return self.active and self.matcher.is_terminated()

    @property
    def constrains(self) -> bool:
        return self.active and not self.failed and not self.matcher.is_terminated()
