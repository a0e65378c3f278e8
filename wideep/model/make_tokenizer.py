"""A whole-word tokenizer for the synthetic checkpoints, built locally with `tokenizers` (no download).

Every vocabulary entry is one pre-token (a lowercase word, one digit or one punctuation mark), and the
decoder joins tokens with single spaces, so decode(ids) re-encodes to exactly ids. Benchmarks like
inference-perf sample random ids, decode them and count tokens client-side: they need that round trip.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
UNK = "<unk>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD, UNK]
# DeepSeek-R1's reasoning and tool-call tokens. Like R1's own tokenizer they are added tokens that are
# not "special" (a plain decode keeps them, so the reasoning and tool-call parsers see them). They take
# the last ids of the vocabulary, so every other id keeps its word.
R1_TOKENS = ["<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
             "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
             "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "```json", "```"]

ENGLISH = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every good
me give our under name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never last let thought
city tree cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those both mark
often letter until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready above
ever red list though feel talk bird soon body dog family direct pose leave song measure door product black short
numeral class wind question happen complete ship area half rock order fire south problem piece told knew pass
since top whole king space heard best hour better true during hundred five remember step early hold west ground
interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit power
town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound
done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh
thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language
among hello hi hey please thank thanks sorry yes no ok okay model token tokens request response server engine expert
lorem ipsum dolor sit amet consectetur adipiscing elit sed eiusmod tempor incididunt ut labore et dolore magna
aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute
irure reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident
sunt culpa qui officia deserunt mollit anim id est laborum
"""
PUNCTUATION = list(".,;:!?'\"()[]{}-_/\\*&%$#@+=<>|~`^")
DIGITS = [str(d) for d in range(10)]
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


def _pseudo_words(n: int, taken: set[str]) -> list[str]:
    """Pronounceable filler words (bako, bakoba, ...) so the vocabulary reaches the model's size."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: list[str] = []
    length = 2
    while len(words) < n:
        for combo in itertools.product(syllables, repeat=length):
            w = "".join(combo)
            if w not in taken:
                words.append(w)
                if len(words) == n:
                    break
        length += 1
    return words


def vocabulary(vocab_size: int = 4096) -> list[str]:
    """Exactly vocab_size entries, so every id the model can emit has text."""
    english: list[str] = []
    seen: set[str] = set()
    for w in ENGLISH.split():
        if w not in seen:
            seen.add(w)
            english.append(w)
    fixed = SPECIAL_TOKENS + PUNCTUATION + DIGITS + english
    tail = ["function"] + R1_TOKENS   # "function": the type word of R1's tool-call format
    if vocab_size < len(fixed) + len(tail):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(fixed) + len(tail)} fixed tokens")
    return fixed + _pseudo_words(vocab_size - len(fixed) - len(tail), seen | {"function"}) + tail


# DeepSeek-R1's chat template, sections for sections: system prompt (+ tools), user turns, assistant
# turns (earlier reasoning dropped, tool calls in R1's native tokens), tool outputs, and a generation
# prompt that opens <think>. Unknown roles raise.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system='', is_tool=false) %}"
    "{% for message in messages %}{% if message['role'] in ['system', 'developer'] %}"
    "{% set ns.system = ns.system + message['content'] %}{% endif %}{% endfor %}"
    "{% if tools %}{% set ns.system = ns.system + '## Tools' %}{% for tool in tools %}"
    "{% set ns.system = ns.system + '\\n### ' + tool['function']['name'] + '\\n' + (tool['function']['description'] or '')"
    " + '\\nParameters: ' + (tool['function']['parameters'] | tojson) %}{% endfor %}{% endif %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.is_tool = false %}{% endif %}"
    "{% set content = message['content'] or '' %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content }}"
    "{% if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}{% for tool in message['tool_calls'] %}"
    "{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n'"
    " + (tool['function']['arguments'] | tojson) + '\\n```<｜tool▁call▁end｜>' }}{% endfor %}"
    "{{ '<｜tool▁calls▁end｜>' }}{% endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if not ns.is_tool %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.is_tool = true %}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% elif message['role'] not in ['system', 'developer'] %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(vocabulary(vocab_size))}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in R1_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def write_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> int:
    """Writes tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2, ensure_ascii=False) + "\n"
    )
    return tok.get_vocab_size()
