"""POST /v1/chat/completions: admission (429 past the queue), images decoded and encoded, a slot chosen by
shared prefix, generation in a worker thread, and the answer as one JSON body or as server-sent events
in OpenAI's chunk format ending with `data: [DONE]`.

A client that goes away (or a request past --request-timeout) cancels its generation: the worker stops
after the token it is computing and the slot is free for the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from medgemma_edge.errors import AuditError
from medgemma_edge.runtime.generate import NOTICE, GenerationResult, stream_parts
from medgemma_edge.serve.apierrors import ApiError, as_api_error, from_user_error
from medgemma_edge.serve.records import answer_fields
from medgemma_edge.serve.requests import to_sampling, wants_thinking
from medgemma_edge.serve.schemas import ChatRequest
from medgemma_edge.serve.slots import Generation, Slot, SlotPool
from medgemma_edge.serve.state import Prepared, ServerState

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting or generating request checks for a vanished client


def ready_pool(state: ServerState) -> SlotPool:
    if state.pool is None:
        raise ApiError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                       "loading", headers={"retry-after": "5"})
    return state.pool


async def chat_completion(state: ServerState, request: Request, body: ChatRequest) -> Response:
    arrived = time.perf_counter()
    pool = ready_pool(state)
    if not pool.admit():
        wait = pool.retry_after()
        raise ApiError(429, f"all {len(pool.slots)} slot(s) are busy and {pool.max_queue} request(s) wait already; "
                            f"retry after {wait} s", "queue_full", headers={"retry-after": str(wait)})
    slot = None
    try:
        sampling = to_sampling(body)
        asked = body.max_tokens is not None or body.max_completion_tokens is not None
        conv = await asyncio.to_thread(state.conversation, body)
        state.metrics.asked_images(len(conv.images))
        prep = await asyncio.to_thread(state.prepare, conv, sampling, asked, wants_thinking(body))
        prep.prepare_ms = (time.perf_counter() - arrived) * 1e3
        deadline = arrived + state.config.limits.request_timeout_s
        slot = await _wait_for_slot(pool, request, prep, deadline)
        job = Job(state, request, prep, slot, arrived, deadline)
    except BaseException:
        if slot is not None:  # Job would have released it when its generation ended
            pool.release(slot)
        pool.leave()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(job.events(include_usage), ping=15, sep="\n")
    return await job.complete()


async def _wait_for_slot(pool: SlotPool, request: Request, prep: Prepared, deadline: float) -> Slot:
    task = asyncio.ensure_future(pool.acquire(prep.atoms))
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        gone = await request.is_disconnected()
        if gone or time.perf_counter() > deadline:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:  # it got a slot just before the cancel landed
                pool.release(task.result())
            if gone:
                raise ApiError(499, "the client closed the connection while waiting for a slot", "client_disconnected")
            raise ApiError(504, "the request waited for a slot past --request-timeout; retry later", "timeout")


class Job:
    """One admitted request holding a slot, from the first token to its audit line."""

    def __init__(self, state: ServerState, request: Request, prep: Prepared, slot: Slot, arrived: float,
                 deadline: float) -> None:
        self.state, self.request, self.prep, self.slot = state, request, prep, slot
        self.st: dict[str, Any] = request.scope["state"]
        self.arrived, self.deadline, self.started = arrived, deadline, time.perf_counter()
        self.reused = slot.shared(prep.atoms)  # what PromptCache.sync will keep
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.first_at: float | None = None
        self.timed_out = self.disconnected = False
        pipe = state.pipe
        assert pipe is not None
        self.gen = Generation(lambda: stream_parts(pipe, prep.parts, prep.images, prep.sampling, slot.cache,
                                                   thinking=prep.thinking), self._done, slot.worker)
        state.generations.add(self.gen)

    def _done(self) -> None:
        assert self.state.pool is not None
        self.state.pool.release(self.slot, time.perf_counter() - self.started)
        self.state.pool.leave()
        self.state.generations.discard(self.gen)

    async def _watch(self, poll_client: bool) -> None:
        while not self.gen.finished.is_set():
            if poll_client and await self.request.is_disconnected():
                self.disconnected = True
                self.gen.cancel()
                return
            if time.perf_counter() > self.deadline:
                self.timed_out = True
                self.gen.cancel()
                return
            try:
                await asyncio.wait_for(self.gen.finished.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass

    async def pieces(self) -> AsyncIterator[tuple[str, str]]:
        """(reasoning, answer) text as it comes; drains the worker to its end."""
        async for kind, value in self.gen.events():
            if kind == "error":
                self.error = value
                continue
            if value.token is not None:
                self.tokens.append(value.token)
                self.first_at = self.first_at or time.perf_counter()
            if value.result is not None:
                self.result = value.result
            if self.timed_out or self.disconnected:
                continue
            if value.text or value.reasoning:
                self.text.append(value.text)
                self.reasoning.append(value.reasoning)
                yield value.reasoning, value.text

    def outcome(self) -> tuple[GenerationResult, str]:
        """The result (made from what was seen when the worker was stopped early) and OpenAI's finish_reason."""
        result = self.result
        if result is None:
            ttft = ((self.first_at or time.perf_counter()) - self.started) * 1e3
            result = GenerationResult("".join(self.text), self.tokens, self.prep.n_prompt, self.prep.n_image_tokens,
                                      "cancelled", {"time_to_first_token_ms": ttft}, self.reused)
        # the model ended (end of turn, a stop sequence, or inside a thought) or it was cut short
        finish = "stop" if result.stop_reason in ("eos", "stop", "unclosed_thought") else "length"
        now = time.perf_counter()
        result.timings.update({  # the library's image_encode_ms is a cache hit: the server encoded in prepare
            "server_prepare_ms": self.prep.prepare_ms,  # decode the images, encode them, tokenize
            "queue_ms": (self.started - self.arrived) * 1e3 - self.prep.prepare_ms,
            "server_time_to_first_token_ms": ((self.first_at or now) - self.arrived) * 1e3,
            "server_total_ms": (now - self.arrived) * 1e3})
        return result, finish

    def failure(self) -> ApiError | None:
        if self.timed_out:
            return ApiError(504, "the answer took longer than --request-timeout; ask for fewer max_tokens", "timeout")
        return as_api_error(self.error) if self.error is not None else None

    def record(self, result: GenerationResult, finish: str) -> dict[str, Any]:
        """The audit fields and the metrics of an answer; returns the usage block."""
        conv, state = self.prep.conv, self.state
        self.st["audit"]["fields"] = {"slot": self.slot.index, **answer_fields(
            state.pipe.info if state.pipe else {}, [u.sha256 for u in conv.images], conv.system, conv.prompt,
            result, "".join(self.text), result.stop_reason, state.audit.include_text)}
        m = state.metrics
        m.answered(result.prompt_tokens, result.image_tokens, result.reused_tokens, len(result.token_ids),
                   result.timings["server_time_to_first_token_ms"] / 1e3, result.timings.get("decode_tokens_per_s", 0.0))
        m.duration.observe(result.timings["server_total_ms"] / 1e3)
        n_out = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n_out,
                "total_tokens": result.prompt_tokens + n_out,
                "prompt_tokens_details": {"cached_tokens": result.reused_tokens, "image_tokens": result.image_tokens}}

    async def write_audit(self) -> None:
        await asyncio.to_thread(self.state.audit.write, self.st["request_id"], "/v1/chat/completions", 200,
                                {"client": self.st.get("client"), "key_id": self.st.get("key_id"),
                                 **self.st["audit"]["fields"]})
        self.st["audit"]["written"] = True

    def _head(self) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.st['request_id']}", "created": int(time.time()),
                "model": self.state.config.model_id}

    async def complete(self) -> Response:
        watch = asyncio.create_task(self._watch(poll_client=True))
        try:
            async for _ in self.pieces():
                pass
        finally:
            watch.cancel()
        if self.disconnected:
            self.st["error_kind"] = "client_disconnected"
            return JSONResponse(ApiError(499, "client closed the connection", "client_disconnected").body(), 499)
        error = self.failure()
        if error is not None:
            raise error
        result, finish = self.outcome()
        usage = self.record(result, finish)
        try:
            await self.write_audit()
        except AuditError as exc:  # an unaudited answer is withheld
            raise from_user_error(exc) from None
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        if result.schema_valid is not None:
            message["schema_valid"] = result.schema_valid
        return JSONResponse({**self._head(), "object": "chat.completion",
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                             "usage": usage, "timings": result.timings, "notice": NOTICE})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, str]:
        body = {**self._head(), "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return {"data": json.dumps(body, ensure_ascii=False)}

    async def events(self, include_usage: bool) -> AsyncIterator[dict[str, str]]:
        watch = asyncio.create_task(self._watch(poll_client=False))  # sse-starlette notices a client gone
        finished = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for reasoning, answer in self.pieces():
                delta = {"content": answer} if answer else {}
                yield self._chunk({**delta, **({"reasoning_content": reasoning} if reasoning else {})})
            error = self.failure()
            if error is not None:
                self.st["error_kind"] = error.kind
                yield {"data": json.dumps(error.body())}
            else:
                result, finish = self.outcome()
                usage = self.record(result, finish)
                yield self._chunk({}, finish, timings=result.timings)
                try:
                    await self.write_audit()
                except AuditError as exc:
                    err = from_user_error(exc)
                    self.st["error_kind"] = err.kind
                    yield {"data": json.dumps(err.body())}
                if include_usage:
                    yield {"data": json.dumps({**self._head(), "object": "chat.completion.chunk", "choices": [],
                                               "usage": usage})}
            yield {"data": "[DONE]"}
            finished = True
        finally:
            watch.cancel()
            if not finished:  # the client went away mid-stream: stop generating, free the slot
                self.gen.cancel()
                self.st["error_kind"] = "client_disconnected"
                if "fields" not in self.st["audit"]:
                    self.st["audit"]["fields"] = {"slot": self.slot.index,
                                                  "tokens": {"prompt": self.prep.n_prompt,
                                                             "generated": len(self.tokens)}}
