#!/usr/bin/env python3
"""Train pipeserve's embedded default model: a tiny Llama that does integer + and - on 0..999.

    python scripts/train_default_model.py                  # train, save, evaluate
    python scripts/train_default_model.py --eval-only      # evaluate the saved model

The model answers both a chat prompt (user message "12+34") and a raw prompt ("12+34=") with
the number and then the eos token. See docs/default_model.md.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "python" / "pipeserve" / "data" / "default_model"
)
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]  # ids 0..7, in this order
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]  # every printable ASCII character
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% else %}<|user|>{{ message['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_OPERAND = 999
HELDOUT_EVERY = 400  # ~1/400 of the 2,000,000 problems (~5000) are held out
OPS = "+-"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fixed, platform-independent hash (unlike Python's hash())."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def heldout_mask() -> np.ndarray:
    """Boolean [op, a, b]: True where the problem (a op b) belongs to the held-out split."""
    n = MAX_OPERAND + 1
    return (
        _mix64(np.arange(len(OPS) * n * n, dtype=np.uint64)) % np.uint64(HELDOUT_EVERY) == 0
    ).reshape(len(OPS), n, n)


def heldout_problems() -> list[tuple[int, str, int]]:
    ops, a, b = np.nonzero(heldout_mask())
    return [(int(x), OPS[o], int(y)) for o, x, y in zip(ops, a, b, strict=True)]


def answer(a: int, op: str, b: int) -> str:
    return str(a + b if op == "+" else a - b)


def chat_prompt(a: int, op: str, b: int) -> str:
    return f"{BOS}<|user|>{a}{op}{b}<|end|><|assistant|>"


def raw_prompt(a: int, op: str, b: int, bos: bool = True) -> str:
    return f"{BOS if bos else ''}{a}{op}{b}="


def uniform_frac_at(step: int, total: int) -> float:
    """Curriculum: many short operands early (they speed up learning digit alignment)."""
    return 0.25 + 0.65 * min(1.0, step / (0.6 * total))


def sample_operands(rng: np.random.Generator, n: int, uniform_frac: float) -> np.ndarray:
    """Uniform on 0..999 (90% 3-digit) with prob uniform_frac, else uniform digit count then value."""
    uniform = rng.integers(0, MAX_OPERAND + 1, n)
    by_len = rng.integers(0, 10 ** rng.integers(1, 4, n))
    return np.where(rng.random(n) < uniform_frac, uniform, by_len)


def sample_train(
    rng: np.random.Generator, n: int, mask: np.ndarray, uniform_frac: float
) -> list[tuple[int, str, int]]:
    ops = rng.integers(0, len(OPS), 2 * n)
    a, b = sample_operands(rng, 2 * n, uniform_frac), sample_operands(rng, 2 * n, uniform_frac)
    keep = ~mask[ops, a, b]  # ~1/400 are held out, so 2n candidates leave n to spare
    return [
        (int(x), OPS[o], int(y))
        for o, x, y in zip(ops[keep][:n], a[keep][:n], b[keep][:n], strict=True)
    ]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char per token
    core.decoder = decoders.Fuse()  # join tokens back without spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def encode_batch(
    tok: PreTrainedTokenizerFast, problems: list[tuple[int, str, int]], rng: random.Random
) -> dict[str, torch.Tensor]:
    """Half chat, half raw prompts (a few raw ones without bos); loss only on answer + eos."""
    texts, n_target = [], []
    for a, op, b in problems:
        r = rng.random()
        prompt = chat_prompt(a, op, b) if r < 0.5 else raw_prompt(a, op, b, bos=r < 0.9)
        ans = answer(a, op, b)
        texts.append(prompt + ans + EOS)
        n_target.append(len(ans) + 1)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, (row, n) in enumerate(zip(ids, n_target, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(row) - n : len(row)] = input_ids[i, len(row) - n : len(row)]
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != tok.pad_token_id).long(),
        "labels": labels,
    }


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
        attn_implementation="eager",  # ~1.5x faster than sdpa on CPU at these sizes
    )
    model = LlamaForCausalLM(config)
    model.generation_config = greedy_generation_config(tok)
    return model


def greedy_generation_config(tok: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, at most 8 new tokens (an answer and its eos), with the tokenizer's special ids."""
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def exact_match(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    problems: list[tuple[int, str, int]],
    chat: bool = True,
    batch_size: int = 500,
) -> float:
    """Greedy-decode each problem through the chat template (or raw 'a+b=') and compare exactly."""
    model.eval()
    tok.padding_side = "left"
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        if chat:
            msgs = [[{"role": "user", "content": f"{a}{op}{b}"}] for a, op, b in chunk]
            prompts = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        else:
            enc = tok([f"{a}{op}{b}=" for a, op, b in chunk], padding=True, return_tensors="pt")
        out = model.generate(**enc, do_sample=False, max_new_tokens=8)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(t == answer(*p) for t, p in zip(texts, chunk, strict=True))
    model.train()
    return correct / len(problems)


def evaluate_dir(out: Path) -> float:
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    problems = heldout_problems()
    start = time.time()
    chat_acc = exact_match(model, tok, problems, chat=True)
    raw_acc = exact_match(model, tok, problems, chat=False)
    print(f"held-out problems: {len(problems)}  eval time: {time.time() - start:.1f}s")
    print(f"held-out exact match (raw 'a+b=' prompt): {raw_acc:.4f}")
    print(f"FINAL held-out exact match (chat template, greedy): {chat_acc:.4f}")
    return chat_acc


def make_optimizer(model: LlamaForCausalLM, lr: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norm gains
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.padding_side = "right"
    tok.save_pretrained(out)
    print(f"saved to {out}")


def train(args: argparse.Namespace) -> None:
    np_rng, py_rng = np.random.default_rng(args.seed), random.Random(args.seed)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    msg = [{"role": "user", "content": "12+34"}]
    rendered = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    # The hand-built training prompt must be exactly what the saved chat template renders.
    assert rendered == chat_prompt(12, "+", 34), rendered
    model = build_model(tok)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    mask = heldout_mask()
    probe_set = random.Random(0).sample(heldout_problems(), 500)
    opt = make_optimizer(model, args.lr)
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        problems = sample_train(np_rng, args.batch_size, mask, uniform_frac_at(step, args.steps))
        loss = model(**encode_batch(tok, problems, py_rng)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            lr, secs = opt.param_groups[0]["lr"], time.time() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {secs:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0:
            acc = exact_match(model, tok, probe_set)
            print(f"step {step:5d}  exact match on 500 held-out: {acc:.3f}", flush=True)
    print(f"training time: {time.time() - start:.0f}s")
    save(model, tok, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
    evaluate_dir(args.out)


if __name__ == "__main__":
    main()
