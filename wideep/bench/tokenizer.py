"""The benchmark's token counter: a local tokenizer.json read with `tokenizers` (no transformers,
no torch, no network). inference-perf counts with the HF fast tokenizer built on the same file,
so prompt lengths and output-token counts agree with it.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

from .config import ConfigError

from wideep import envs


def resolve_tokenizer_dir(name_or_path: str) -> Path:
    """A directory holding tokenizer.json: the path itself, or the model's snapshot in the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.name == "tokenizer.json":
        return p.parent
    if (p / "tokenizer.json").is_file():
        return p
    hub = Path(envs.HF_HUB_CACHE or Path(envs.HF_HOME or Path.home() / ".cache/huggingface") / "hub")
    pattern = str(hub / f"models--{name_or_path.replace('/', '--')}" / "snapshots" / "*" / "tokenizer.json")
    hits = sorted(glob.glob(pattern))
    if hits:
        return Path(hits[-1]).parent
    raise ConfigError(
        f"tokenizer.pretrained_model_name_or_path: no tokenizer.json at {name_or_path!r} nor in the HF cache "
        f"({hub}); pass --tokenizer DIR with a local copy (wideep bench never downloads)"
    )


class BenchTokenizer:
    """count_tokens/decode with the semantics inference-perf's CustomTokenizer uses."""

    def __init__(self, name_or_path: str):
        from tokenizers import Tokenizer

        self.dir = resolve_tokenizer_dir(name_or_path)
        self._tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        special = {tid for tid, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        cfg_file = self.dir / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            names = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")]
            names += list(cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or [])
            for n in names:
                if isinstance(n, dict):
                    n = n.get("content")
                if isinstance(n, str) and (tid := self._tok.token_to_id(n)) is not None:
                    special.add(tid)
        self.special_ids = special
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        self.valid_ids = [i for i in range(self.vocab_size) if i not in special]
        if not self.valid_ids:
            raise ConfigError(f"tokenizer at {self.dir} has no non-special tokens to sample prompts from")

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        if not text:
            return 0
        return len(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
