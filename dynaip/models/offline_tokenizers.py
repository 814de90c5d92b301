"""Small tokenizers built offline, in the on-disk formats the real models ship with.

The tiny checkpoints need a CLIP BPE tokenizer (vocab.json + merges.txt), a T5 tokenizer
(tokenizer.json, Unigram) and a BERT WordPiece tokenizer (vocab.txt). Real releases ship
their own; these are only for tests and the demo. Every character of printable ASCII is
in each vocabulary, so any English prompt tokenizes without unknown tokens.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# Words frequent in captions, detection phrases and prompts; each becomes one token.
WORDS = (
    "a an the of and with in on at to for from by is are photo picture image style wearing holding "
    "person man woman boy girl child people face head body hair shirt dress jacket pants shoes hat "
    "dog cat bird horse animal toy car bike motorcycle rocket astronaut coffee cup mug bag chair table "
    "red green blue yellow black white brown pink orange purple gray beach city street park room forest "
    "snow sky water sunset garden kitchen painting sketch anime watercolor standing sitting running "
    "left right middle front back next together two three"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable-unicode table (every byte maps to one visible character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(out: Path, max_length: int = 77) -> None:
    """CLIP BPE files: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: ((w o) r) d</w>
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in seen:
                merges.append(pair)
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "do_lower_case": True,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "errors": "replace",
            },
            indent=2,
            sort_keys=True,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
            sort_keys=True,
        )
    )


def clip_vocab_size(tokenizer_dir: Path) -> int:
    return len(json.loads((tokenizer_dir / "vocab.json").read_text()))


def write_t5_tokenizer(out: Path, max_length: int = 512) -> int:
    """A T5-style Unigram tokenizer.json (Metaspace pre-tokenizer, `</s>` appended). Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    printable = [c for c in string.printable if not c.isspace()]
    pieces += [(c, -8.0) for c in printable] + [("▁" + c, -7.5) for c in printable]
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]  # first occurrence wins
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "model_max_length": max_length,
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "extra_ids": 0,
                "additional_special_tokens": [],
            },
            indent=2,
            sort_keys=True,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2, sort_keys=True)
    )
    return len(pieces)


def write_bert_vocab(out: Path) -> int:
    """An uncased WordPiece vocab.txt + tokenizer_config.json. Returns the vocab size."""
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    printable = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab = specials + printable + ["##" + c for c in printable] + [w for w in WORDS if w not in printable]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512},
            indent=2,
            sort_keys=True,
        )
    )
    return len(vocab)
