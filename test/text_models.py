"""Tokenizers and a checkpoint for testing text: byte-level BPE tokenizers that split multi-byte
characters over several tokens, a sentencepiece-style one with byte fallback, and a tiny Llama
checkpoint whose greedy output is a chosen text (nothing is downloaded)."""

from __future__ import annotations

import itertools
import os

import torch

SPECIALS = ["<s>", "</s>", "<start>"]  # <start>: the token after which the chosen text follows


def byte_chars() -> dict[int, str]:
    """The byte-level alphabet: each byte as a printable character (bytes that are printable
    Latin-1 stand for themselves; the others take the code points from 256 on)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars


def unique_pieces(text: str) -> list[bytes]:
    """`text`'s UTF-8 bytes cut into pieces that are all different: each piece is as short as
    possible (one byte where it can), so characters spread over several pieces."""
    data, pieces, used, i = text.encode(), [], set(), 0
    while i < len(data):
        k = 1
        while data[i : i + k] in used and i + k < len(data):
            k += 1
        pieces.append(data[i : i + k])
        used.add(data[i : i + k])
        i += k
    return pieces


def byte_level_tokenizer(pieces: list[bytes] = (), cleanup: bool = False):
    """Byte-level BPE over the 256 bytes plus `pieces` as extra tokens (no merges: encoding gives
    one token per byte; the extra tokens only come out of a model). `cleanup`: decode applies
    transformers' clean_up_tokenization ("do n't" -> "don't"), as it did for BPE before v5."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for piece in pieces:
        vocab.setdefault("".join(chars[b] for b in piece), len(vocab))
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=cleanup,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=cleanup,
    )


def byte_fallback_tokenizer():
    """Sentencepiece-style (Llama-2, Mistral): "▁" for spaces, a few letters and words, and
    <0x00>..<0xFF> for every byte of anything else (a run of them decodes all at once)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for c in "▁abcdefghijklmnopqrstuvwxyz.,'!?":
        vocab[c] = len(vocab)
    merges = [("▁", "d"), ("▁d", "o"), ("n", "'"), ("n'", "t"), ("▁", "g"), ("▁g", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_text_checkpoint(path: str, text: str, cleanup: bool = False, layers: int = 2):
    """A Llama checkpoint and byte-level tokenizer whose greedy continuation of `<start>` is
    `text` (as the raw decode, before any clean-up), then EOS. Returns the tokenizer and the
    output ids. The model is a successor table: its layers add nothing to the residual (zero
    output projections), so the logits depend on the last token alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pieces = unique_pieces(text)
    tok = byte_level_tokenizer(pieces, cleanup)
    chars = byte_chars()
    ids = tok.convert_tokens_to_ids(["".join(chars[b] for b in p) for p in pieces])
    start, eos = tok.convert_tokens_to_ids("<start>"), tok.eos_token_id
    hidden = 64
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.nn.functional.normalize(torch.randn(len(tok), hidden), dim=-1)
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(len(tok), hidden)
        chain = [start, *ids, eos]
        for prev, nxt in itertools.pairwise(chain):
            head[nxt] = emb[prev]  # the logit of nxt peaks where the last token is prev
        model.lm_head.weight.copy_(head)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<start>"
    tok.save_pretrained(path)
    return tok, [*ids, eos]
