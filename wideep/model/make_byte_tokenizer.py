"""A byte-level BPE tokenizer for the synthetic checkpoints, like DeepSeek's own (GPT-2 style bytes,
so any text, JSON included, has an exact tokenization and every token stands for fixed bytes).

The default tiny tokenizer (make_tokenizer.py) joins whole words with spaces, which cannot spell
`{"a":1}`; grammar-constrained decoding is exercised with this one instead. Same special tokens at the
same ids, same vocabulary size, merges learned locally from the tiny vocabulary plus JSON-ish text.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .make_tokenizer import BOS, SPECIAL_TOKENS, vocabulary


def _corpus(vocab_size: int) -> list[str]:
    words = [w for w in vocabulary(vocab_size) if w not in SPECIAL_TOKENS]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += ['{"name": "value", "id": 12, "ok": true, "list": [1, 2, 3], "none": null}',
              '{"a":1,"b":[true,false],"c":{"d":"e"}}', "0123456789 -+.eE", "\"\\/bfnrtu"]
    return lines * 3


def build_byte_level_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(vocab_size), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


def write_byte_level_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> int:
    """Replaces out_dir/tokenizer.json (tokenizer_config.json, with the chat template, is kept)."""
    out = Path(out_dir)
    tok = build_byte_level_tokenizer(vocab_size)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, "special tokens must keep their ids"
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)
