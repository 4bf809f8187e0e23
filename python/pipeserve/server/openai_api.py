"""/v1/completions and /v1/chat/completions: parse, run every choice, answer as JSON or SSE."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeserve.frontend.images import ImageProcessor
from pipeserve.frontend.request_state import RequestState
from pipeserve.ipc.messages import ImageIn
from pipeserve.sampling_params import INT32_MAX
from pipeserve.server.chat import chat_parts
from pipeserve.server.jobs import checked as _checked
from pipeserve.server.jobs import run_all
from pipeserve.server.limits import PieceBound
from pipeserve.server.protocol import (
    ApiError,
    Capacity,
    Job,
    check_model,
    check_prompt_count,
    choices,
    get,
    int_in,
    logprobs_count,
    priority,
    sampling_params,
    stream_flags,
    token_lists,
)
from pipeserve.server.push import DONE, Throttle, encode_json


@dataclass(frozen=True)
class ModelInfo:
    tokenizer: Any
    names: set[str]
    name: str
    vocab_size: int
    context_length: int
    kv_slots: int = 2**62  # the KV pool's size in tokens (RankGroup.info["num_slots"])
    max_prompt_chars: int | None = None  # longer texts cannot fit (server.limits); None: unknown
    images: ImageProcessor | None = None  # a vision-language model's; None: a text model

    @cached_property
    def image_processor(self) -> ImageProcessor:
        return self.images or ImageProcessor.text_only(self.name)

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.context_length, self.kv_slots)

    @cached_property
    def piece_bound(self) -> PieceBound | None:
        return PieceBound.of(self.tokenizer)


# ---- parsing ------------------------------------------------------------------------------------------
def encode(m: ModelInfo, text: str, param: str, **kwargs: Any) -> list[int]:
    """Token ids of `text`; a text too long to fit even at the longest token is refused untokenized."""
    check_chars(m, len(text), param)
    check_pieces(m, text, param)
    return m.tokenizer.encode(text, **kwargs)


def check_chars(m: ModelInfo, chars: int, param: str) -> None:
    if m.max_prompt_chars is not None and chars > m.max_prompt_chars:
        raise ApiError(
            f"'{param}' has {chars} characters, more than any prompt that fits "
            f"{m.capacity.max_sequence} tokens can have ({m.max_prompt_chars})",
            param,
            code="context_length_exceeded",
        )


def check_pieces(m: ModelInfo, text: str, param: str) -> None:
    """Where no character count bounds a prompt's tokens (see server.limits.PieceBound)."""
    limit = m.capacity.max_sequence
    if m.max_prompt_chars is not None or m.piece_bound is None:
        return
    if m.piece_bound.at_least(text, limit):
        raise ApiError(
            f"'{param}' has at least {limit} tokens, more than the {limit - 1} that a prompt "
            "may have to fit with one completion token",
            param,
            code="context_length_exceeded",
        )


def prompt_texts(value: Any, param: str) -> list[str] | None:
    """`value` as a list of prompt texts (a string or a non-empty list of strings); None if it is
    something else (token ids, say)."""
    if isinstance(value, str):
        value = [value]
    elif not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return None
    check_prompt_count(value, param)
    if not all(value):
        raise ApiError(f"'{param}' must not be empty, nor hold an empty string", param)
    return value


def parse_completion(body: dict, m: ModelInfo) -> Job:
    check_model(body, m.names, m.name)
    prompt = body.get("prompt")
    texts = prompt_texts(prompt, "prompt")
    if texts is not None:
        prompts = [encode(m, t, "prompt") for t in texts]
    elif isinstance(prompt, list) and prompt:
        prompts = token_lists(prompt, "prompt", m.vocab_size)
    else:
        raise ApiError(
            "'prompt' must be a non-empty string, list of strings, or token ids", "prompt"
        )
    if any(not p for p in prompts):
        raise ApiError("'prompt' encodes to no tokens", "prompt")
    max_tokens = int_in(body, "max_tokens", 1, INT32_MAX, 16)
    for p in prompts:
        too_long = len(p) >= m.capacity.max_sequence
        m.capacity.check(len(p), max_tokens, "prompt" if too_long else "max_tokens")
    logprobs = logprobs_count(body, "logprobs", None)
    stream, usage = stream_flags(body)
    params = sampling_params(body, max_tokens, m.vocab_size)
    return Job(prompts, params, choices(body), stream, logprobs, usage, priority(body))


def chat_prompt(body: dict, m: ModelInfo) -> tuple[list[int], list[ImageIn]]:
    """The chat's prompt ids (its images' tokens included) and its images."""
    parts = chat_parts(body.get("messages"), m.image_processor)
    if not getattr(m.tokenizer, "chat_template", None):
        raise ApiError("this model has no chat template; use /v1/completions", "messages")
    check_chars(m, parts.chars, "messages")  # the template adds more
    text = m.tokenizer.apply_chat_template(
        parts.messages, add_generation_prompt=True, tokenize=False
    )
    ids = encode(m, text, "messages", add_special_tokens=False)
    return m.image_processor.prepare(ids, parts.sources, parts.names, "messages")


def parse_chat(body: dict, m: ModelInfo) -> Job:
    check_model(body, m.names, m.name)
    fmt = get(body, "response_format", dict, {"type": "text"})
    if fmt.get("type", "text") != "text":
        raise ApiError(
            f"response_format {str(fmt.get('type'))[:100]!r} is not supported", "response_format"
        )
    stream, usage = stream_flags(body)
    ids, images = chat_prompt(body, m)
    limit = m.capacity.max_sequence
    max_tokens = int_in(body, "max_completion_tokens", 1, INT32_MAX, None)
    if max_tokens is None:  # absent: the rest of the context (and of the KV pool), at least one
        max_tokens = int_in(body, "max_tokens", 1, INT32_MAX, max(1, limit - len(ids)))
    m.capacity.check(len(ids), max_tokens, "messages" if len(ids) >= limit else "max_tokens")
    logprobs = None
    if get(body, "logprobs", bool, False):
        logprobs = logprobs_count(body, "top_logprobs", 0)
    elif body.get("top_logprobs") is not None:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params = sampling_params(body, max_tokens, m.vocab_size)
    return Job([ids], params, choices(body), stream, logprobs, usage, priority(body), [images])


# ---- answering ----------------------------------------------------------------------------------------
SKIP_TOKENIZER = "--skip-tokenizer-init"


class NoTokenizer:
    """Stands in for the tokenizer when the server runs with --skip-tokenizer-init: using it for
    text (a text prompt, a chat) is a 400 naming the flag; it has no other attribute."""

    @property
    def chat_template(self) -> str:
        raise ApiError(
            f"chats need a tokenizer; this server runs with {SKIP_TOKENIZER}", "messages"
        )

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        raise ApiError(
            f"this server runs with {SKIP_TOKENIZER} (no tokenizer): prompts must be token ids"
        )

    apply_chat_template = encode


def has_text(m: ModelInfo) -> bool:
    return not isinstance(m.tokenizer, NoTokenizer)


def check_text_free(job: Job, m: ModelInfo) -> None:
    """Without a tokenizer there is no text to match stop strings against."""
    if job.params.stop and not has_text(m):
        raise ApiError(
            f"stop strings need a tokenizer; this server runs with {SKIP_TOKENIZER} "
            "(use stop_token_ids)",
            "stop",
        )


def token_text(m: ModelInfo, token: int) -> str:
    """One token's text, for logprobs; `token_id:N` without a tokenizer."""
    return m.tokenizer.decode([int(token)]) if has_text(m) else f"token_id:{token}"


def _finish(state: RequestState) -> str:
    reason = (state.finish_reason or {}).get("type", "stop")
    return "length" if reason == "length" else "stop"


def _usage(states: list[RequestState], prompts: list[list[int]]) -> dict:
    """OpenAI counts each prompt once, however many choices (n) it has; `states` in choice order
    (prompt by prompt, n choices each). Cached tokens: each prompt's first choice's, as stage 0's
    prefix cache gave them."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(s.output_ids) for s in states)
    n = max(1, len(states) // max(1, len(prompts)))
    cached = sum(s.cached_tokens for s in states[::n])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_logprobs(m: ModelInfo, s: RequestState, start: int = 0, offset: int = 0) -> dict:
    """Tokens from `start` on; `offset`: where token `start` begins in the completion's text."""
    tokens = [token_text(m, t) for t in s.output_ids[start:]]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = [{token_text(m, t): lp for t, lp in step} for step in s.top_logprobs[start:]]
    return {
        "tokens": tokens,
        "token_logprobs": s.logprobs[start:],
        "top_logprobs": tops or None,
        "text_offset": offsets,
    }


def chat_logprobs(m: ModelInfo, s: RequestState, start: int = 0) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(m, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for i, (token, logprob) in enumerate(
        zip(s.output_ids[start:], s.logprobs[start:], strict=False)
    ):
        top = s.top_logprobs[start + i] if start + i < len(s.top_logprobs) else []
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content}


def _text_fields(s: RequestState, chat: bool, text: str, start: int) -> dict:
    """A choice's text (`message` or `delta` for chat); without a tokenizer, its token ids."""
    if chat:
        return {"content": text}
    if s.stream is None:
        return {"text": "", "token_ids": s.output_ids[start:]}
    return {"text": text}


async def complete(frontend: Any, job: Job, m: ModelInfo, chat: bool) -> dict:
    check_text_free(job, m)
    states = await run_all(frontend, job)
    out = []
    for i, s in enumerate(states):
        choice: dict[str, Any] = {"index": i, "finish_reason": _finish(s), "logprobs": None}
        if job.logprobs is not None:
            choice["logprobs"] = chat_logprobs(m, s) if chat else completion_logprobs(m, s)
        fields = _text_fields(s, chat, s.text or "", 0)
        choice.update({"message": {"role": "assistant", **fields}} if chat else fields)
        out.append(choice)
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": _id(chat),
        "object": kind,
        "created": int(time.time()),
        "model": m.name,
        "choices": out,
        "usage": _usage(states, job.prompts),
    }


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


class CompletionEvents:
    """A streamed completion's server-sent events: one chunk per choice per step (for chat, led by
    one chunk that gives every choice its role), then a usage chunk if asked for and [DONE]. A
    choice's text deltas are the pieces its TextStream releases, so that they add up to the
    non-streamed text. Built step by step, from the output reader (server.push)."""

    def __init__(
        self, job: Job, m: ModelInfo, chat: bool, states: list[RequestState], interval: int
    ) -> None:
        check_text_free(job, m)
        self.job, self.m, self.chat, self.states = job, m, chat, states
        self.throttle = Throttle(job.num_requests, interval)
        self.id, self.created = _id(chat), int(time.time())
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.cursors = [0] * job.num_requests  # per choice: TextStream pieces sent
        self.text_offsets = [0] * job.num_requests  # where its next logprob text starts
        self.roles_sent = not chat
        # every chunk's fields before its choices, encoded once: a chunk encodes only its choices
        head = {"id": self.id, "object": self.kind, "created": self.created, "model": m.name}
        self.head = b"data: " + encode_json(head)[:-1] + b',"choices":'

    def _chunk(self, choices_: list[dict], usage: dict | None = None) -> bytes:
        if usage is not None:
            return self.head + encode_json(choices_) + b',"usage":' + encode_json(usage) + b"}\n\n"
        return self.head + encode_json(choices_) + b"}\n\n"

    def step(self, changed: list[int]) -> list[bytes]:
        """The events for the choices that changed (raises ApiError for a failed one)."""
        out = []
        if not self.roles_sent:
            role = {"role": "assistant", "content": ""}
            roles = [
                {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                for i in range(self.job.num_requests)
            ]
            out.append(self._chunk(roles))
            self.roles_sent = True
        for i in changed:
            s = _checked(self.states[i])
            start = self.throttle.take(i, s)
            if start is not None:
                out.append(self._choice(i, s, start))
        return out

    def _choice(self, i: int, s: RequestState, start: int) -> bytes:
        """Choice `i`'s chunk: its tokens from `start` on."""
        text = ""
        if s.stream is not None:
            text, self.cursors[i] = s.stream.since(self.cursors[i])
        choice: dict[str, Any] = {
            "index": i,
            "finish_reason": _finish(s) if s.finished else None,
            "logprobs": None,
        }
        if self.job.logprobs is not None and self.chat:
            choice["logprobs"] = chat_logprobs(self.m, s, start)
        elif self.job.logprobs is not None:
            offset = self.text_offsets[i]
            choice["logprobs"] = completion_logprobs(self.m, s, start, offset)
            self.text_offsets[i] = offset + sum(len(t) for t in choice["logprobs"]["tokens"])
        fields = _text_fields(s, self.chat, text, start)
        choice.update({"delta": fields} if self.chat else fields)
        return self._chunk([choice])

    def end(self) -> list[bytes]:
        """After every choice has finished: the usage chunk (if asked for) and [DONE]."""
        if not self.job.include_usage:
            return [DONE]
        return [self._chunk([], _usage(self.states, self.job.prompts)), DONE]
