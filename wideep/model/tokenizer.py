"""Tokenizer layer of the frontend: HF tokenizer.json through `tokenizers`, chat templates from
tokenizer_config.json (rendered by wideep.utils.chat_template), and incremental detokenization for streaming.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from wideep.utils.chat_template import ChatTemplate, model_dir_template


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # AddedToken serialized form
        return v.get("content")
    return v


class Tokenizer:
    """A model directory's tokenizer: encode/decode token ids, render chat prompts."""

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj}: not found (the model directory needs a tokenizer.json)")
        self._tok = _HFTokenizer.from_file(str(tj))
        cfg_path = d / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        src = model_dir_template(d, self.config)
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(src, self.bos_token or "", self.eos_token or "") if src is not None else None)

    def set_chat_template(self, source: str | dict[str, str]) -> None:
        """--chat-template: the server's template replaces the model's."""
        self.chat_template = ChatTemplate(source, self.bos_token or "", self.eos_token or "")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the chat template (wideep.utils.chat_template, shared with the router).
        With tokenize=True, returns ids encoded without adding special tokens (the template carries BOS).
        `chat_template` renders a caller-supplied template instead (the server allows it only with
        --trust-request-chat-template)."""
        if chat_template is not None:
            template = ChatTemplate(chat_template, self.bos_token or "", self.eos_token or "")
        elif self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json 'chat_template'); "
                             "use the completions API or pass a template")
        else:
            template = self.chat_template
        text = template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer(model_dir)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    Decodes a short window [prefix_offset:] and emits only what extends the text of [prefix_offset:read_offset],
    and holds back while the new text ends in U+FFFD (the decoder's mark for an incomplete UTF-8 sequence),
    so a multi-byte character split across byte-level tokens is never emitted in halves. Decoding from a
    token boundary keeps space handling (word-joining or byte-level 'Ġ') identical to a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        # a little prompt context so the first generated token decodes with its leading space
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: int | Sequence[int]) -> str:
        """Append generated id(s); return the newly complete text (possibly empty)."""
        if isinstance(new_ids, int):
            self.ids.append(new_ids)
        else:
            self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: emit whatever is held back (even an incomplete character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        delta = full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
