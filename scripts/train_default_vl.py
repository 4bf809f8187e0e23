#!/usr/bin/env python3
"""Train pipeserve's embedded vision-language model: a tiny Qwen2.5-VL that reads an image of an
integer + or - problem on 0..999 (drawn by arith_vl_images.py) and answers the number.

    python scripts/train_default_vl.py                 # train, save, write the held-out file, evaluate
    python scripts/train_default_vl.py --eval-only     # evaluate the saved model

The language model is the text default model (python/pipeserve/data/default_model), frozen: it
already answers <|bos|><|user|>12+34<|end|><|assistant|>. An image of "12+34" has one image token
per character, in order, at the text's rotary positions, and the chat template puts nothing around
them; so only the vision tower and merger train, to turn each character's cell into that
character's text embedding (a regression on the merger's output; no language-model forward).
Problems of the text model's held-out split are never trained on. See docs/default_model.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from arith_vl_images import from_data_url, problem_text, random_style, render, to_data_url
from default_vl_build import (
    DEFAULT_OUT,
    IMAGE_PAD,
    ROOT,
    build_image_processor,
    build_model,
    build_tokenizer,
    save,
)
from train_default_model import (
    answer,
    chat_prompt,
    heldout_mask,
    heldout_problems,
    lr_at,
    sample_train,
)

HELDOUT_FILE = ROOT / "examples" / "arith_vl" / "arith_vl_heldout.jsonl"
HELDOUT_FILE_SIZE = 400  # problems written to HELDOUT_FILE (a fixed sample of the 5081)
# The user turn trained for: lmms-eval's chat model sends [image_url, text]; the task's text is "".
USER_CONTENT = [{"type": "image"}, {"type": "text", "text": ""}]


class Prompts:
    """The chat prompt around n image tokens, as the saved chat template renders it."""

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.tok, self.image_id = tok, tok.convert_tokens_to_ids(IMAGE_PAD)
        text = tok.apply_chat_template(
            [{"role": "user", "content": USER_CONTENT}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.image_id)
        self.before, self.after = ids[:at], ids[at + 1 :]

    def ids(self, n: int) -> list[int]:
        return self.before + [self.image_id] * n + self.after

    def check_matches_text_model(self) -> None:
        """With its image tokens read as characters, the prompt is the text model's chat prompt."""
        chars = iter(self.tok("12+34", add_special_tokens=False)["input_ids"])
        got = [next(chars) if i == self.image_id else i for i in self.ids(5)]
        want = self.tok(chat_prompt(12, "+", 34), add_special_tokens=False)["input_ids"]
        assert got == want, (got, want)

    def pad_left(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
        # transformers 5 gives image tokens their (t, h, w) positions only where this marks them
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_id).int(),
        }


def pixels(
    processor: Qwen2VLImageProcessorPil, images: list[Image.Image]
) -> dict[str, torch.Tensor]:
    out = processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def rendered(problems: list[tuple[int, str, int]], seed: int) -> list[tuple[Image.Image, str]]:
    """Problem i of a list drawn with its own style, fixed by (seed, i), and its answer."""
    return [
        (render(a, op, b, random_style(random.Random(seed * 1_000_003 + i))), answer(a, op, b))
        for i, (a, op, b) in enumerate(problems)
    ]


@torch.no_grad()
def exact_match(
    model: Qwen2_5_VLForConditionalGeneration,
    prompts: Prompts,
    processor: Qwen2VLImageProcessorPil,
    items: list[tuple[Image.Image, str]],
    batch_size: int = 250,
) -> tuple[float, list[int]]:
    """Greedy answers to (image, expected answer) pairs; the exact-match rate and the misses."""
    model.eval()
    misses = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        enc = prompts.pad_left([prompts.ids(image.width // 28) for image, _ in chunk])
        enc.update(pixels(processor, [image for image, _ in chunk]))
        out = model.generate(**enc, do_sample=False, max_new_tokens=8)
        texts = prompts.tok.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        misses += [
            i + k for k, (t, (_, want)) in enumerate(zip(texts, chunk, strict=True)) if t != want
        ]
    return 1 - len(misses) / len(items), misses


class Reader:
    """The vision tower and merger, trained so that each image token (the merger's output, one per
    28x28 cell) equals the text embedding of the character drawn in its cell."""

    def __init__(
        self, model: Qwen2_5_VLForConditionalGeneration, tok: PreTrainedTokenizerFast
    ) -> None:
        self.visual, self.tok = model.model.visual, tok
        self.embed = model.model.language_model.embed_tokens.weight.detach()  # (vocab, hidden)
        self.chars = torch.tensor(tok.convert_tokens_to_ids(list("0123456789+-")))

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(image tokens of the batch, hidden), the images' tokens one after another."""
        return self.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output

    def target_ids(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [i for t in texts for i in self.tok(t, add_special_tokens=False)["input_ids"]]
        )

    def loss(self, got: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared error relative to the targets' mean squared norm."""
        want = self.embed[ids]
        return (got - want).pow(2).sum(-1).mean() / want.pow(2).sum(-1).mean()

    @torch.no_grad()
    def char_accuracy(self, got: torch.Tensor, ids: torch.Tensor) -> float:
        """How often the nearest character embedding is the one drawn."""
        nearest = self.chars[torch.cdist(got, self.embed[self.chars]).argmin(-1)]
        return (nearest == ids).float().mean().item()


def train(args: argparse.Namespace) -> None:
    np_rng, py_rng = np.random.default_rng(args.seed), random.Random(args.seed)
    torch.manual_seed(args.seed)
    tok, processor = build_tokenizer(), build_image_processor()
    model = build_model(tok, [0, 0, 8])
    Prompts(tok).check_matches_text_model()
    model.model.language_model.requires_grad_(False)
    reader = Reader(model, tok)
    params = list(reader.visual.parameters())
    print(
        f"parameters: {sum(p.numel() for p in model.parameters()):,} (trained: {sum(p.numel() for p in params):,})"
    )
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    mask = heldout_mask()
    probe_problems = random.Random(0).sample(heldout_problems(), 500)
    probe = pixels(processor, [image for image, _ in rendered(probe_problems, seed=3)])
    probe_ids = reader.target_ids([problem_text(*p) for p in probe_problems])
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        problems = sample_train(np_rng, args.batch_size, mask, args.uniform_frac)
        batch = pixels(processor, [render(a, op, b, random_style(py_rng)) for a, op, b in problems])
        loss = reader.loss(
            reader.tokens(batch), reader.target_ids([problem_text(*p) for p in problems])
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                got = reader.tokens(probe)
            print(
                f"step {step:5d}  loss {loss.item():.5f}  held-out loss {reader.loss(got, probe_ids).item():.5f}  "
                f"char acc {reader.char_accuracy(got, probe_ids):.4f}  {time.time() - start:.0f}s",
                flush=True,
            )
    print(f"training time: {time.time() - start:.0f}s")
    save(model, tok, processor, args.out)


def heldout_file_problems() -> list[tuple[int, str, int]]:
    return sorted(random.Random(0).sample(heldout_problems(), HELDOUT_FILE_SIZE))


def write_heldout_file(path: Path) -> None:
    """The lmms-eval / server set: images as PNG data URLs."""
    problems = heldout_file_problems()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for (a, op, b), (image, ans) in zip(problems, rendered(problems, seed=1), strict=True):
            row = {"problem": problem_text(a, op, b), "image": to_data_url(image), "answer": ans}
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(problems)} problems to {path} ({path.stat().st_size:,} bytes)")


def read_heldout_file(path: Path) -> list[tuple[Image.Image, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(from_data_url(row["image"]), row["answer"]) for row in rows]


def evaluate_dir(out: Path, heldout_file: Path) -> float:
    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = Qwen2VLImageProcessorPil.from_pretrained(out)
    prompts = Prompts(tok)
    prompts.check_matches_text_model()
    start = time.time()
    problems = heldout_problems()
    acc, misses = exact_match(model, prompts, processor, rendered(problems, seed=2))
    print(f"held-out split, all {len(problems)} problems (own styles): {acc:.4f}")
    print("missed:", " ".join(problem_text(*problems[i]) for i in misses[:40]))
    acc, misses = exact_match(model, prompts, processor, read_heldout_file(heldout_file))
    print(f"eval time: {time.time() - start:.1f}s")
    print(f"FINAL {heldout_file.name} exact match, greedy: {acc:.4f} ({len(misses)} missed)")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--heldout-file", type=Path, default=HELDOUT_FILE)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--uniform-frac", type=float, default=0.5)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
        write_heldout_file(args.heldout_file)
    evaluate_dir(args.out, args.heldout_file)


if __name__ == "__main__":
    main()
