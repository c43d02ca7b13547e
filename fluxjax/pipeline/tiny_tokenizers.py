"""Small tokenizers in the hub's FLUX layout, trained locally: the `tiny` preset's and the tests'.

`make_tokenizers(root)` writes
  root/tokenizer/    CLIP byte-level BPE: vocab.json, merges.txt, tokenizer_config.json,
                     special_tokens_map.json (what transformers' CLIPTokenizer reads)
  root/tokenizer_2/  T5 sentencepiece: spiece.model plus what T5TokenizerFast.save_pretrained
                     writes (tokenizer.json, tokenizer_config.json, ...)

The CLIP vocabulary follows CLIP's layout: the 256 byte symbols, the same 256 with the
end-of-word marker "</w>", one entry per merge (in merge order), then <|startoftext|> and
<|endoftext|> as the last two ids. The merges are learnt with the `tokenizers` BPE trainer on
the few lines below. The T5 model is a sentencepiece unigram model trained on the same lines,
with T5's special ids: <pad> 0, </s> 1, <unk> 2 (no <s>); T5TokenizerFast adds the 100
<extra_id_*> sentinels after the sentencepiece vocabulary, as for the real T5.

Both are tiny (a few hundred entries) and are built in well under a second.
"""

from __future__ import annotations

import io
import json
import os

CORPUS = [
    "a photo of a cat sitting on a red sofa in the living room",
    "a watercolor painting of a lighthouse by the sea at sunset",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "a bowl of ramen with eggs, noodles and green onions on a wooden table",
    "the quick brown fox jumps over the lazy dog",
    "portrait of an old man with a beard, dramatic lighting, oil on canvas",
    "a futuristic city skyline at night with flying cars and neon signs",
    "a small wooden cabin in a snowy forest under the northern lights",
    "close-up of a hummingbird drinking nectar from a purple flower",
    "an isometric pixel art castle on a floating island with waterfalls",
    "a cup of coffee next to an open book on a rainy afternoon",
    "black and white photograph of a train station in the 1920s",
    "A Portrait Of The Queen, Oil On Canvas; The Eiffel Tower At Dawn (HDR)",
    "Zebra, yak, jaguar and quokka: a vintage X-ray poster? ünïcode café naïve",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _clip_merges(num_merges: int, corpus: list[str]) -> list[tuple[str, str]]:
    """BPE merges learnt by the `tokenizers` trainer, with CLIP's end-of-word suffix."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) * 2 + num_merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _write_clip(folder: str, corpus: list[str], num_merges: int = 300) -> None:
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = []
    for a, b in _clip_merges(num_merges, corpus):
        if a not in vocab or b not in vocab:  # only merges whose parts are already tokens
            continue
        merged = a + b
        if merged in vocab:
            continue
        vocab[merged] = len(vocab)
        merges.append(f"{a} {b}")
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                **special,
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": CLIP_MAX_LENGTH,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": True,
            },
            f,
            indent=2,
        )


def _write_t5(folder: str, corpus: list[str], vocab_size: int = 200) -> None:
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    os.makedirs(folder, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    spiece = os.path.join(folder, "spiece.model")
    with open(spiece, "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100}, f, indent=2)
    # transformers converts spiece.model into a fast tokenizer; saving it back writes the
    # tokenizer.json the hub's tokenizer_2/ also holds beside spiece.model.
    T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)


def make_tokenizers(root: str | os.PathLike, corpus: list[str] | None = None) -> None:
    """Write hub-style `tokenizer/` (CLIP BPE) and `tokenizer_2/` (T5 sentencepiece) under root,
    both learnt from `corpus` (lines of text; default `CORPUS`; the shapes model passes its grammar's captions)."""
    root = os.fspath(root)
    corpus = CORPUS if corpus is None else list(corpus)
    _write_clip(os.path.join(root, "tokenizer"), corpus)
    _write_t5(os.path.join(root, "tokenizer_2"), corpus)
