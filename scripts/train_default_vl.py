#!/usr/bin/env python3
"""Train pipeserve's embedded vision-language model: a tiny Qwen2.5-VL that reads an image of an
integer + or - problem on 0..999 (drawn by arith_vl_images.py) and answers the number.

    python scripts/train_default_vl.py                 # train, save, write the held-out file, evaluate
    python scripts/train_default_vl.py --eval-only     # evaluate the saved model

The language model starts from the text default model (python/pipeserve/data/default_model), so
that mostly the reading has to be learned; the vision tower starts from scratch. Problems of the
text model's held-out split are never trained on. See docs/default_model.md.
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
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from arith_vl_images import cell_text, from_data_url, random_style, render, to_data_url
from default_vl_build import (
    DEFAULT_OUT,
    IMAGE_PAD,
    IMAGE_TOKENS,
    ROOT,
    build_image_processor,
    build_model,
    build_tokenizer,
    save,
)
from train_default_model import answer, heldout_mask, heldout_problems, lr_at, sample_train

HELDOUT_FILE = ROOT / "examples" / "arith_vl" / "arith_vl_heldout.jsonl"
HELDOUT_FILE_SIZE = 1000  # problems written to HELDOUT_FILE (a fixed sample of the 5081)
QUESTION = "What is the answer?"
# The user turns trained on; lmms-eval's chat model sends [image, text], its simple model [text, image].
LAYOUTS: list[list[dict]] = [
    [{"type": "image"}, {"type": "text", "text": QUESTION}],
    [{"type": "text", "text": QUESTION}, {"type": "image"}],
    [{"type": "image"}],
]
LAYOUT_WEIGHTS = [0.6, 0.25, 0.15]


class Batcher:
    """Token ids and image tensors for problems; the prompt is rendered by the chat template."""

    def __init__(self, tok: PreTrainedTokenizerFast, processor: Qwen2VLImageProcessorPil) -> None:
        self.tok, self.processor = tok, processor
        self.image_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        self.prompts = [self.prompt_ids(layout) for layout in LAYOUTS]

    def prompt_ids(self, content: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.image_id)  # one <|image_pad|> per image token
        return ids[:at] + [self.image_id] * IMAGE_TOKENS + ids[at + 1 :]

    def images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def pad(self, rows: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row), 1
        # mm_token_type_ids: transformers needs it to build the (t, h, w) positions of image tokens
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_id).int(),
        }

    def train_batch(
        self, problems: list[tuple[int, str, int]], rng: random.Random
    ) -> dict[str, torch.Tensor]:
        """Loss only on the answer and the eos; cell_ids: the character under each image token."""
        rows, n_target, images, cells = [], [], [], []
        for a, op, b in problems:
            style = random_style(rng)
            images.append(render(a, op, b, style))
            cells.append(cell_text(a, op, b, style))
            prompt = self.prompts[rng.choices(range(len(LAYOUTS)), LAYOUT_WEIGHTS)[0]]
            target = self.tok(answer(a, op, b), add_special_tokens=False)["input_ids"]
            rows.append(prompt + target + [self.tok.eos_token_id])
            n_target.append(len(target) + 1)
        batch = self.pad(rows, left=False)
        labels = torch.full_like(batch["input_ids"], -100)
        for i, (row, n) in enumerate(zip(rows, n_target, strict=True)):
            labels[i, len(row) - n : len(row)] = batch["input_ids"][i, len(row) - n : len(row)]
        cell_ids = torch.tensor(self.tok(cells, add_special_tokens=False)["input_ids"]).flatten()
        return {**batch, **self.images(images), "labels": labels, "cell_ids": cell_ids}


@torch.no_grad()
def exact_match(
    model: Qwen2_5_VLForConditionalGeneration,
    batcher: Batcher,
    items: list[tuple[Image.Image, str]],
    layout: int = 0,
    batch_size: int = 250,
) -> float:
    """Greedy-decode (image, expected answer) pairs under one prompt layout; exact text match."""
    model.eval()
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        enc = {**batcher.pad([batcher.prompts[layout]] * len(chunk), left=True)}
        enc.update(batcher.images([image for image, _ in chunk]))
        out = model.generate(**enc, do_sample=False, max_new_tokens=8)
        texts = batcher.tok.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(t == want for t, (_, want) in zip(texts, chunk, strict=True))
    model.train()
    return correct / len(items)


def rendered(problems: list[tuple[int, str, int]], seed: int) -> list[tuple[Image.Image, str]]:
    """Problem i of a list drawn with its own style, fixed by (seed, i)."""
    return [
        (render(a, op, b, random_style(random.Random(seed * 1_000_003 + i))), answer(a, op, b))
        for i, (a, op, b) in enumerate(problems)
    ]


def heldout_file_problems() -> list[tuple[int, str, int]]:
    return sorted(random.Random(0).sample(heldout_problems(), HELDOUT_FILE_SIZE))


def write_heldout_file(path: Path) -> None:
    """The lmms-eval / server set: images as PNG data URLs (about 420 bytes each)."""
    problems = heldout_file_problems()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for (a, op, b), (image, ans) in zip(problems, rendered(problems, seed=1), strict=True):
            row = {
                "problem": f"{a}{op}{b}",
                "question": QUESTION,
                "image": to_data_url(image),
                "answer": ans,
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(problems)} problems to {path} ({path.stat().st_size:,} bytes)")


def read_heldout_file(path: Path) -> list[tuple[Image.Image, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(from_data_url(row["image"]), row["answer"]) for row in rows]


def evaluate_dir(out: Path, heldout_file: Path) -> float:
    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    batcher = Batcher(tok, Qwen2VLImageProcessorPil.from_pretrained(out))
    start = time.time()
    file_items = read_heldout_file(heldout_file)
    every = rendered(heldout_problems(), seed=2)
    print(
        f"held-out split, all {len(every)} problems (own styles), [image, text]: "
        f"{exact_match(model, batcher, every):.4f}"
    )
    for layout, name in ((1, "[text, image]"), (2, "[image]")):
        print(f"{heldout_file.name}, {name}: {exact_match(model, batcher, file_items, layout):.4f}")
    acc = exact_match(model, batcher, file_items)
    print(f"eval time: {time.time() - start:.1f}s")
    print(
        f"FINAL {heldout_file.name} ({len(file_items)} problems) exact match, "
        f"[image, text] chat prompt, greedy: {acc:.4f}"
    )
    return acc


class ReadingLoss:
    """Deep supervision of the reading: each image token's embedding (the merger's output) is
    pulled toward the text embedding of the character in its cell (a space where blank), so the
    vision tower learns to hand the language model characters as the text model saw them."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration) -> None:
        self.embed = model.model.language_model.embed_tokens
        self.image_embeds: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self.keep)

    def keep(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.image_embeds = output.pooler_output  # (images * IMAGE_TOKENS, hidden), token order

    def __call__(self, cell_ids: torch.Tensor) -> torch.Tensor:
        assert self.image_embeds is not None
        want = self.embed.weight[cell_ids].detach()
        err = (self.image_embeds - want).pow(2).sum(-1).mean()
        return err / want.pow(2).sum(-1).mean()  # relative squared error


def make_optimizer(
    model: Qwen2_5_VLForConditionalGeneration, args: argparse.Namespace
) -> torch.optim.AdamW:
    """The vision tower learns from scratch at --lr; the pretrained language model at --lm-lr."""
    groups = []
    for part, lr in ((model.model.visual, args.lr), (model.model.language_model, args.lm_lr)):
        params = list(part.parameters())
        groups.append(
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1, "base_lr": lr}
        )
        groups.append(
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": lr}
        )
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))


def train(args: argparse.Namespace) -> None:
    np_rng, py_rng = np.random.default_rng(args.seed), random.Random(args.seed)
    torch.manual_seed(args.seed)
    tok, processor = build_tokenizer(), build_image_processor()
    model = build_model(tok, args.mrope_section)
    batcher = Batcher(tok, processor)
    print(
        f"parameters: {sum(p.numel() for p in model.parameters()):,} "
        f"(vision {sum(p.numel() for p in model.model.visual.parameters()):,})"
    )
    mask = heldout_mask()
    probe = rendered(random.Random(0).sample(heldout_problems(), 500), seed=3)
    opt, reading = make_optimizer(model, args), ReadingLoss(model)
    start = time.time()
    for step in range(args.steps):
        scale = lr_at(step, args.steps, 1.0, args.warmup)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        problems = sample_train(np_rng, args.batch_size, mask, args.uniform_frac)
        batch = batcher.train_batch(problems, py_rng)
        cell_ids = batch.pop("cell_ids")
        answer_loss = model(**batch).loss
        reading_loss = reading(cell_ids)
        loss = answer_loss + args.reading_weight * reading_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {answer_loss.item():.4f}  reading {reading_loss.item():.4f}  "
                f"lr x{scale:.3f}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0:
            acc = exact_match(model, batcher, probe)
            print(f"step {step:5d}  exact match on 500 held-out: {acc:.3f}", flush=True)
    print(f"training time: {time.time() - start:.0f}s")
    save(model, tok, processor, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--heldout-file", type=Path, default=HELDOUT_FILE)
    parser.add_argument("--steps", type=int, default=2600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="vision tower peak learning rate")
    parser.add_argument(
        "--lm-lr", type=float, default=1e-3, help="language model peak learning rate"
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--uniform-frac", type=float, default=0.75)
    parser.add_argument("--mrope-section", type=int, nargs=3, default=[0, 0, 8])
    parser.add_argument("--reading-weight", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
        write_heldout_file(args.heldout_file)
    evaluate_dir(args.out, args.heldout_file)


if __name__ == "__main__":
    main()
