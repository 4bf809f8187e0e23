"""/v1/completions and /v1/chat/completions: parse, run every choice, answer as JSON or SSE."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pipeserve.engine.request_state import RequestState
from pipeserve.server.jobs import run_all, run_streaming
from pipeserve.server.protocol import (
    ApiError,
    Job,
    check_context,
    check_model,
    choices,
    get,
    sampling_params,
    stream_flags,
    token_lists,
)


@dataclass(frozen=True)
class ModelInfo:
    tokenizer: Any
    names: set[str]
    name: str
    vocab_size: int
    context_length: int


# ---- parsing ------------------------------------------------------------------------------------------
def parse_completion(body: dict, m: ModelInfo) -> Job:
    check_model(body, m.names, m.name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [m.tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [m.tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = token_lists(prompt, "prompt", m.vocab_size)
    else:
        raise ApiError(
            "'prompt' must be a non-empty string, list of strings, or token ids", "prompt"
        )
    if any(not p for p in prompts):
        raise ApiError("'prompt' encodes to no tokens", "prompt")
    max_tokens = get(body, "max_tokens", int, 16)
    for p in prompts:
        check_context(
            len(p),
            max_tokens,
            m.context_length,
            "max_tokens" if len(p) < m.context_length else "prompt",
        )
    logprobs = get(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(f"'logprobs' must be between 0 and 20, got {logprobs}", "logprobs")
    stream, usage = stream_flags(body)
    return Job(prompts, sampling_params(body, max_tokens), choices(body), stream, logprobs, usage)


def chat_prompt(body: dict, m: ModelInfo) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    plain = [_message(i, msg) for i, msg in enumerate(messages)]
    if not getattr(m.tokenizer, "chat_template", None):
        raise ApiError("this model has no chat template; use /v1/completions", "messages")
    text = m.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return m.tokenizer.encode(text, add_special_tokens=False)


def _message(i: int, msg: Any) -> dict:
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise ApiError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    content = msg.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    f"messages[{i}].content",
                )
            parts.append(part["text"])
        content = "\n".join(parts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise ApiError(
            f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content"
        )
    return {"role": msg["role"], "content": content}


def parse_chat(body: dict, m: ModelInfo) -> Job:
    check_model(body, m.names, m.name)
    fmt = get(body, "response_format", dict, {"type": "text"})
    if fmt.get("type", "text") != "text":
        raise ApiError(f"response_format {fmt.get('type')!r} is not supported", "response_format")
    ids = chat_prompt(body, m)
    max_tokens = get(body, "max_completion_tokens", int, None)
    if max_tokens is None:  # absent: the rest of the context, and at least one token
        max_tokens = get(body, "max_tokens", int, max(1, m.context_length - len(ids)))
    check_context(
        len(ids),
        max_tokens,
        m.context_length,
        "messages" if len(ids) >= m.context_length else "max_tokens",
    )
    logprobs = None
    if get(body, "logprobs", bool, False):
        logprobs = get(body, "top_logprobs", int, 0)
        if not 0 <= logprobs <= 20:
            raise ApiError(
                f"'top_logprobs' must be between 0 and 20, got {logprobs}", "top_logprobs"
            )
    stream, usage = stream_flags(body)
    return Job([ids], sampling_params(body, max_tokens), choices(body), stream, logprobs, usage)


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
    """OpenAI counts each prompt once, however many choices (n) it has."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(s.output_ids) for s in states)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
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


async def stream(frontend: Any, job: Job, m: ModelInfo, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice per step (for chat, led by one chunk that gives
    every choice its role), a usage chunk if asked for, then [DONE]. The first event waits for the
    first token, so that a refused request is still a plain HTTP error. A choice's text deltas are
    the pieces its TextStream releases, so that they add up to the non-streamed text."""
    check_text_free(job, m)
    rid, created = _id(chat), int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    cursors: dict[int, int] = {}  # per choice: TextStream pieces sent
    seen: dict[int, int] = {}  # per choice: tokens sent
    text_offsets: dict[int, int] = {}  # per choice: where its next token's logprob text starts
    finals: dict[int, RequestState] = {}

    def chunk(choices_: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": kind, "created": created, "model": m.name, "choices": choices_}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    role = {"role": "assistant", "content": ""}
    roles = [
        {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
        for i in range(job.num_requests)
    ]
    async for i, s in run_streaming(frontend, job):
        if chat and roles:
            yield chunk(roles)
            roles = []
        if i in finals:
            continue  # a state queued again after it finished: everything has been sent
        text = ""
        if s.stream is not None:
            text, cursors[i] = s.stream.since(cursors.get(i, 0))
        start = seen.get(i, 0)
        seen[i] = len(s.output_ids)
        choice: dict[str, Any] = {
            "index": i,
            "finish_reason": _finish(s) if s.finished else None,
            "logprobs": None,
        }
        if job.logprobs is not None and chat:
            choice["logprobs"] = chat_logprobs(m, s, start)
        elif job.logprobs is not None:
            offset = text_offsets.get(i, 0)
            choice["logprobs"] = completion_logprobs(m, s, start, offset)
            text_offsets[i] = offset + sum(len(t) for t in choice["logprobs"]["tokens"])
        fields = _text_fields(s, chat, text, start)
        choice.update({"delta": fields} if chat else fields)
        if s.finished:
            finals[i] = s
        yield chunk([choice])
    if job.include_usage:
        yield chunk([], _usage(list(finals.values()), job.prompts))
    yield "data: [DONE]\n\n"
