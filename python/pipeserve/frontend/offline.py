"""The offline API: `Engine(model_path=..., pp_size=..., ...).generate(prompts, sampling_params)`.

The Engine is a front end like the HTTP server: it tokenizes, hands requests to stage 0 over IPC,
and assembles the per-step deltas that come back. The ranks run in their own processes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from numbers import Integral
from typing import Any

import zmq

from pipeserve.config import EngineConfig, model_name, resolve_config
from pipeserve.frontend.client import EngineLimits, RequestClient, RequestOptions
from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.images import ImageProcessor
from pipeserve.frontend.main_guard import check_main_guard
from pipeserve.frontend.ranks import RankFailure, RankGroup
from pipeserve.frontend.request_state import RequestState, format_result
from pipeserve.frontend.tokenizer import load_tokenizer
from pipeserve.ipc.messages import AbortReq, GenerateBatch, ImageIn, ShutdownReq
from pipeserve.ipc.sockets import FrontendSockets, IpcAddresses
from pipeserve.sampling_params import SamplingParams
from pipeserve.utils import all_plain_ints

logger = logging.getLogger("pipeserve.engine")

Prompt = str | list[int]


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        check_main_guard()  # before anything is bound or spawned
        self.config: EngineConfig = resolve_config(model_path=model_path, **kwargs)
        cfg = self.config
        self.tokenizer = (
            None
            if cfg.skip_tokenizer_init
            else load_tokenizer(cfg.tokenizer_path or cfg.model_path)
        )
        self.detokenizer = None if self.tokenizer is None else Detokenizer(self.tokenizer)
        self.images = ImageProcessor.load(cfg, model_name(cfg.model_path), self.tokenizer)
        self.ipc = IpcAddresses.fresh()
        self.sockets = FrontendSockets(self.ipc)
        self.client = RequestClient(self.detokenizer)
        self.stats: dict[str, Any] = {}
        self.ranks = RankGroup(self.config, self.ipc)
        self.closed = False
        try:  # a Ctrl-C anywhere after the spawn stops the ranks (the exit would wait on them)
            self.info = self.ranks.wait_ready()
            self.limits = EngineLimits.from_info(self.info)
        except BaseException:
            self.shutdown()
            raise

    # ---- generation ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt | list[Prompt] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        priority: int = 0,
        image_data: Any = None,
    ) -> dict | list[dict]:
        """One dict per prompt and choice: text, output_ids and meta_info (token counts, finish
        reason, and logprobs when asked). With `n` > 1 in a prompt's sampling params its n choices
        come one after another. A single prompt with n = 1 gives a single dict. Every prompt is
        checked before any is submitted.

        `image_data` (a vision-language model): for one prompt an image or a list of them, for
        several prompts one entry per prompt (None, an image or a list); an image is a PIL image,
        encoded bytes, a path, a data:, file:// or (with allow_image_fetch) http(s) URL, or
        base64. Each image needs its placeholder in its prompt, in order (for Qwen-VL
        <|vision_start|><|image_pad|><|vision_end|>, as the chat template writes it)."""
        prompts, single = self._normalize(prompt if input_ids is None else input_ids)
        prompts, images = self.images.prepare_prompts(prompts, image_data, not single, "prompt")
        raw = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(raw) != len(prompts):
            raise ValueError(f"{len(raw)} sampling_params for {len(prompts)} prompts")
        params = [SamplingParams.from_dict(p) for p in raw]
        prompts = [self._check_prompt(ids, f"prompt {i}") for i, ids in enumerate(prompts)]
        items = [(ids, c) for ids, p in zip(prompts, params, strict=True) for c in p.choices()]
        item_images = [ims for ims, p in zip(images, params, strict=True) for _ in p.choices()]
        self._check_fits(items)
        self._check_open()
        states = self._submit(items, return_logprob, top_logprobs_num, priority, item_images)
        self.wait(states)
        results = [self.result(s) for s in states]
        return results[0] if single and len(results) == 1 else results

    def _check_prompt(self, ids: list[int], name: str) -> list[int]:
        """`ids` as plain ints; what stage 0 would refuse is refused here first, naming the prompt."""
        if not ids:
            raise ValueError(f"{name} has no tokens")
        plain = all_plain_ints(ids)  # the usual case, without an ABC check per token
        bad = None if plain else next((t for t in ids if not _is_token_int(t)), None)
        if bad is not None:
            raise ValueError(f"{name}: token ids must be integers, got {bad!r}")
        limit = self.limits.context_length
        if len(ids) >= limit:
            raise ValueError(
                f"{name} has {len(ids)} tokens; the context length is {limit} "
                "(a prompt must leave room for one new token)"
            )
        return list(ids) if plain else [int(t) for t in ids]

    def _normalize(self, prompt: Any) -> tuple[list[list[int]], bool]:
        if prompt is None:
            raise ValueError("generate() needs a prompt or input_ids")
        # one prompt: a string, or a list of scalars (checked as token ids later)
        single = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and not isinstance(prompt[0], list | tuple | str)
        )
        items = [prompt] if single else list(prompt)
        for i, p in enumerate(items):
            if not isinstance(p, str | list | tuple):
                raise ValueError(f"prompt {i} must be a string or a list of token ids, got {p!r}")
        return [
            self._encode(p, i) if isinstance(p, str) else list(p) for i, p in enumerate(items)
        ], single

    def _encode(self, text: str, index: int) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"prompt {index} is text, but the engine runs with skip_tokenizer_init=True "
                "(no tokenizer): give token ids"
            )
        return self.tokenizer.encode(text)

    def submit(
        self,
        ids: list[int],
        params: SamplingParams | dict,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        priority: int = 0,
        images: list[ImageIn] | None = None,
    ) -> RequestState:
        """One request; `images`: a vision-language prompt's preprocessed images, their tokens
        in `ids` (stage 0 checks that they agree)."""
        if not images:
            return self.submit_many([(ids, params)], return_logprob, top_logprobs_num, priority)[0]
        self._check_open()
        ids = self._check_prompt(list(ids), "request 0")
        params = SamplingParams.from_dict(params) if isinstance(params, dict) else params
        self._check_fits([(ids, params)])
        opts = RequestOptions(return_logprob, top_logprobs_num, priority)
        msg, state = self.client.new_request(ids, params, opts, images=images)
        self._send(msg)
        return state

    def submit_many(
        self,
        items: list[tuple[list[int], SamplingParams]],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        priority: int = 0,
    ) -> list[RequestState]:
        """Queues (prompt ids, params) pairs in one message, so that they are scheduled together.
        Params may be dicts; each pair is one request (`n` is expanded by `generate`). Stage 0
        admits waiting requests by (priority, arrival): lower priority values first."""
        if not items:
            return []
        self._check_open()
        checked = [
            (
                self._check_prompt(list(ids), f"request {i}"),
                SamplingParams.from_dict(p) if isinstance(p, dict) else p,
            )
            for i, (ids, p) in enumerate(items)
        ]
        self._check_fits(checked)
        return self._submit(checked, return_logprob, top_logprobs_num, priority)

    def _check_fits(self, items: list[tuple[list[int], SamplingParams]]) -> None:
        """Refuses a request the KV pool cannot hold whole: it would end short of max_new_tokens."""
        for i, (ids, p) in enumerate(items):
            if (why := self.limits.kv_fit_error(len(ids), p.max_new_tokens)) is not None:
                raise ValueError(f"request {i}: {why}")

    def _submit(
        self,
        items: list[tuple[list[int], SamplingParams]],
        return_logprob: bool,
        top_logprobs_num: int,
        priority: int = 0,
        images: list[list[ImageIn]] | None = None,
    ) -> list[RequestState]:
        """Sends checked (ids, params) pairs (and each one's images, if any) as one message."""
        if self.detokenizer is None and any(params.stop for _, params in items):
            raise ValueError(
                "stop strings need a tokenizer, and the engine runs with skip_tokenizer_init=True: "
                "use stop_token_ids"
            )
        opts = RequestOptions(return_logprob, top_logprobs_num, priority)
        reqs, states = [], []
        for i, (ids, params) in enumerate(items):
            req, state = self.client.new_request(
                ids, params, opts, images=images[i] if images else None
            )
            reqs.append(req)
            states.append(state)
        self._send(reqs[0] if len(reqs) == 1 else GenerateBatch(reqs))
        return states

    def _check_not_closed(self) -> None:
        if self.closed:
            raise RuntimeError("the engine is shut down")

    def _check_open(self) -> None:
        """Not shut down, and every rank alive (a dead one shuts the engine down)."""
        self._check_not_closed()
        try:
            self.ranks.check_alive()
        except RankFailure:
            self.shutdown()
            raise

    def _send(self, msg: Any) -> None:
        self._check_not_closed()
        try:
            self.sockets.send(msg)
        except zmq.Again:  # stage 0 stopped reading: a dead rank says why, else say what failed
            self._check_open()
            raise RuntimeError("stage 0 did not take the message within 2 s") from None

    def wait(self, states: list[RequestState], timeout_s: float | None = None) -> None:
        """Blocks until every one of `states` has finished, or raises TimeoutError after
        `timeout_s`; raises RankFailure if a rank dies. Outputs of other outstanding requests that
        arrive meanwhile are kept for their own wait. Interrupted (TimeoutError, Ctrl-C), it aborts
        the unfinished ones, which a later `wait` sees finish with reason abort."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not all(s.finished for s in states):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"requests unfinished after {timeout_s:g}s")
                self.poll(
                    0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                )
        except RankFailure:
            self.shutdown()
            raise
        except BaseException:
            if not self.closed:
                for s in states:
                    if not s.finished:
                        self.abort(s)
            raise

    def poll(self, timeout_s: float) -> None:
        """Applies the next batch of outputs, waiting up to `timeout_s`; checks the ranks if none."""
        self._check_not_closed()
        msg = self.sockets.recv(timeout_s)
        if msg is None:
            self.ranks.check_alive()
            return
        self.stats = msg.stats
        _, ended_here = self.client.apply(msg)
        for rid in ended_here:  # a stop string: stage 0 still runs it
            self._send(AbortReq(rid))

    def abort(self, state: RequestState) -> None:
        """Asks stage 0 to drop the request; `wait` then sees it finish with reason abort."""
        self._send(AbortReq(state.rid))

    def result(self, s: RequestState) -> dict:
        if s.error is not None:
            raise ValueError(s.error)
        return format_result(s)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(zmq.ZMQError):  # stage 0 may be gone already
                self.sockets.send(ShutdownReq())
        finally:
            self.ranks.stop()
            self.sockets.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.shutdown()


def _is_token_int(t: Any) -> bool:
    """An integer of any kind (numpy's included), but not a bool."""
    return isinstance(t, Integral) and not isinstance(t, bool)
