"""The HTTP server: OpenAI-compatible completions and chat completions, classify / NER, embeddings and search
(`serve.embeddings`), health, metrics.

Completion requests, streamed or not, go to their model's decode loop (`batching="continuous"`, the
default: `lmforge.serve.scheduler`) or micro-batcher (`"micro"`: `lmforge.serve.batching`; also what
models the decode loop cannot run use, such as encoder-decoders).

An expert mixture (a BTM ensemble, a DEMix model) says which domains its posterior chose: every choice (and every
stream's chunk that ends a choice) carries `"lmforge": {"domain": ..., "domains": {domain: weight},
"prompt_domains": {...}}`, and a non-streamed body a top-level `"lmforge": {"domain", "domains"}` (the mean over
its choices); `/metrics` counts requests per model and domain.

Limits: at most `max_concurrent` requests are worked on at once and `max_queue` more wait for a slot;
beyond that a request gets 429 with `Retry-After`. A decode loop holds at most `max_batch` rows and
`max_cache_tokens` reserved cache tokens (prompt + max_tokens per row); rows beyond wait their turn. A request that is not done within `timeout_s` (waiting included) gets
408 and its rows stop; a client that goes away stops its rows too. `max_tokens` above `max_tokens_cap`,
and prompt + max_tokens above the model's position limit, are 400s.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable, Optional

from fastapi import FastAPI, Request, Response

from lmforge.errors import LmforgeError
from lmforge.generate import Completion, Decoding, context_limit, encode_prompt
from lmforge.generate.mixtures import decode_loop_runs
from lmforge.generate.structured import check_grammar, json_grammar, regex_grammar
from lmforge.serve.batching import Batcher, Job
from lmforge.serve.embeddings import embedding_routes
from lmforge.serve.errors import APIError, Gate, install_error_handlers
from lmforge.serve.metrics import Metrics, prometheus_text
from lmforge.serve.models import ServedModel
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import ChatRequest, ClassifyRequest, CompletionRequest, NerRequest, Sampling
from lmforge.serve.streaming import EventStream, sse, stream_rows
from lmforge.tasks.predict import classify_texts, tag_texts

MAX_ROWS = 64  # prompts × n per request
BATCHING = ("continuous", "micro")


class Admission:
    """At most `max_concurrent` requests at work and `max_queue` waiting; 429 beyond."""

    def __init__(self, max_concurrent: int, max_queue: int, metrics: Metrics):
        self.max_concurrent, self.max_queue, self.metrics = max_concurrent, max_queue, metrics
        self.slots: Optional[asyncio.Semaphore] = None

    async def acquire(self, deadline: float) -> Callable[[], None]:
        """Wait for a slot; returns the function that gives it back (safe to call twice)."""
        m = self.metrics
        if m.in_flight + m.waiting >= self.max_concurrent + self.max_queue:
            raise APIError(429, f"the server is busy ({m.in_flight} requests at work, {m.waiting} waiting); "
                                "retry later", type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self.slots = self.slots or asyncio.Semaphore(self.max_concurrent)
        m.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            m.cancel()
            raise APIError(408, "timed out waiting for a free slot", type="timeout", code="timeout") from None
        finally:
            m.waiting -= 1
        m.in_flight += 1
        released = []

        def release():
            if not released:
                released.append(True)
                m.in_flight -= 1
                self.slots.release()
        return release


class Server:
    def __init__(self, models: dict[str, ServedModel], *, batching: str, max_batch: int, max_wait_ms: float,
                 max_cache_tokens: int, max_concurrent: int, max_queue: int, timeout_s: float, max_tokens_cap: int):
        self.models = models
        self.batching, self.max_batch, self.max_wait_s = batching, max_batch, max_wait_ms / 1000
        self.max_cache_tokens = max_cache_tokens
        self.timeout_s, self.max_tokens_cap = timeout_s, max_tokens_cap
        self.metrics = Metrics()
        self.admission = Admission(max_concurrent, max_queue, self.metrics)
        self.engines: dict[str, Batcher | Scheduler] = {}
        self.executors: dict[str, ThreadPoolExecutor] = {}

    def start(self) -> None:
        for name, served in self.models.items():
            if served.kind == "generate" and (served.draft is not None or self.batching == "continuous"
                                              and decode_loop_runs(served.model)):
                self.engines[name] = Scheduler(served, self.max_batch, self.max_cache_tokens, self.metrics)
            elif served.kind == "generate":
                self.engines[name] = Batcher(served, self.max_batch, self.max_wait_s, self.metrics)
            else:
                self.executors[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lmforge-{name}")

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.close()
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ lookups and checks

    def model(self, name: str, kind: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"the model {name!r} does not exist (this server has: {', '.join(self.models)})",
                           param="model", code="model_not_found")
        if served.kind != kind:
            route = {"generate": "/v1/completions", "classification": "/v1/classify", "ner": "/v1/ner",
                     "embedding": "/v1/embeddings"}[served.kind]
            raise APIError(400, f"the model {name!r} is a {served.kind} model; use {route}", param="model",
                           code="wrong_model_kind")
        return served

    def plan(self, served: ServedModel, prompts: list[str], body: Sampling, max_tokens: Optional[int],
             logprobs: Optional[int] = None) -> tuple[list[tuple[str, Decoding]], list[int]]:
        """Rows (prompt × n) with their decoding settings, and each prompt's token count; checks the limits."""
        if len(prompts) * body.n > MAX_ROWS:
            raise APIError(400, f"prompts × n is {len(prompts) * body.n}; at most {MAX_ROWS} per request", param="n")
        if max_tokens is not None and max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's cap of {self.max_tokens_cap}",
                           param="max_tokens", code="invalid_value")
        limit = context_limit(served.model)
        grammar = self.grammar(served, body.response_format)
        counts = [len(encode_prompt(served.tokenizer, served.model, p)) for p in prompts]
        rows = []
        for prompt, count in zip(prompts, counts):
            wanted = max_tokens
            if wanted is None:  # chat without max_tokens: as much as fits, up to the cap
                wanted = min(self.max_tokens_cap, (limit - count) if limit else self.max_tokens_cap)
            if limit is not None and count + max(wanted, 1) > limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens; the request needs "
                                    f"{count + wanted} ({count} in the prompt, {wanted} for the completion); "
                                    "shorten the prompt or lower max_tokens",
                               param="prompt" if count >= limit else "max_tokens", code="context_length_exceeded")
            if (count + wanted) * body.n > self.max_cache_tokens:
                raise APIError(400, f"the request needs {(count + wanted) * body.n} cache tokens ((prompt {count} + "
                                    f"max_tokens {wanted}) x n {body.n}); this server holds at most "
                                    f"{self.max_cache_tokens}", param="max_tokens", code="context_length_exceeded")
            for j in range(body.n):
                rows.append((prompt, Decoding(
                    max_new_tokens=wanted, temperature=body.temperature,
                    top_p=body.top_p if body.top_p < 1.0 else None, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty, stop=tuple(body.stop or ()),
                    seed=body.seed + j if body.seed is not None else None, logprobs=logprobs, grammar=grammar)))
        self.metrics.tokens(sum(counts), 0)
        return rows, counts

    def grammar(self, served: ServedModel, response_format) -> Optional[str]:
        """The llguidance grammar of a `response_format` (None for text); 400 when it cannot be compiled or this
        model's decoder cannot enforce it."""
        if response_format is None or response_format.type == "text":
            return None
        engine = self.engines[served.name]
        if not isinstance(engine, Scheduler) or served.draft is not None:
            raise APIError(400, f"response_format: the model {served.name!r} is served without continuous batching "
                                "(--batching micro, a draft, or a model the decode loop cannot run)",
                           param="response_format")
        try:
            if response_format.type == "regex":
                grammar = regex_grammar(response_format.regex)
            else:
                schema = response_format.json_schema.schema_ if response_format.type == "json_schema" else None
                grammar = json_grammar(schema)
            check_grammar(grammar, served.tokenizer, served.model.get_output_embeddings().weight.shape[0])
        except LmforgeError as err:
            raise APIError(400, f"response_format: {err}", param="response_format") from None
        return grammar

    # ------------------------------------------------------------------ running work

    async def run_rows(self, served: ServedModel, rows, request: Request) -> list[Completion]:
        """Non-streaming rows through the model's batcher, bounded by admission, timeout and disconnects."""
        deadline = time.monotonic() + self.timeout_s
        release = await self.admission.acquire(deadline)
        loop = asyncio.get_running_loop()
        job = Job(rows, loop, loop.create_future())
        try:
            self.engines[served.name].submit(job)
            return await self._wait(job.future, job.cancel, request, deadline)
        finally:
            release()

    async def run_task(self, served: ServedModel, work: Callable[[], list], request: Request) -> list:
        """Classification / NER work on the model's own thread."""
        deadline = time.monotonic() + self.timeout_s
        release = await self.admission.acquire(deadline)
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executors[served.name], work)
            return await self._wait(future, threading.Event(), request, deadline)
        finally:
            release()

    async def _wait(self, future, cancel: threading.Event, request: Request, deadline: float):
        while True:
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait({future}, timeout=max(0.0, min(0.25, left)))
            if done:
                return future.result()
            if await request.is_disconnected():
                cancel.set()
                self.metrics.cancel()
                raise APIError(499, "the client closed the request", code="client_closed")
            if time.monotonic() >= deadline:
                cancel.set()
                self.metrics.cancel()
                raise APIError(408, f"the request took longer than {self.timeout_s:g} s", type="timeout",
                               code="timeout")

    def count_domains(self, served: ServedModel, completions: list[Completion]) -> dict:
        """Count the request under its likeliest domain (expert mixtures); its top-level extension field."""
        found = _request_domains(completions)
        if found is None:
            return {}
        self.metrics.domain(served.name, found["domain"])
        return {"lmforge": found}

    def stream(self, served: ServedModel, rows, cancel: threading.Event, deadline: float):
        """The rows' text pieces and completions as they are made (see `stream_rows`)."""
        return stream_rows(served, self.engines[served.name], rows, cancel, deadline, self.metrics)

    async def open_stream(self) -> tuple[Callable, float, threading.Event]:
        """A slot for a stream: (release, deadline, cancel event); the stream's clean-up releases it."""
        deadline = time.monotonic() + self.timeout_s
        release = await self.admission.acquire(deadline)
        return release, deadline, threading.Event()


def _usage(counts: list[int], completions: list[Completion]) -> dict:
    prompt = sum(counts)  # each prompt is counted once, whatever n is
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _choice_domains(c: Completion) -> dict:
    """An expert mixture's choice: `{"lmforge": {"domain", "domains", "prompt_domains"}}` ({} for other models)."""
    if not c.domains:
        return {}
    return {"lmforge": {"domain": max(c.domains, key=c.domains.get), "domains": c.domains,
                        "prompt_domains": c.prompt_domains}}


def _request_domains(completions: list[Completion]) -> Optional[dict]:
    """A request's domains: the mean posterior over its choices and the likeliest domain (None: not a mixture)."""
    found = [c.domains for c in completions if c.domains]
    if not found:
        return None
    mean = {d: round(sum(x[d] for x in found) / len(found), 4) for d in found[0]}
    return {"domain": max(mean, key=mean.get), "domains": mean}


def _logprobs(c: Completion) -> Optional[dict]:
    if c.logprobs is None:
        return None
    return {"tokens": [t for t, _, _, _ in c.logprobs], "token_logprobs": [lp for _, _, lp, _ in c.logprobs],
            "top_logprobs": [alts for _, _, _, alts in c.logprobs], "text_offset": [o for _, o, _, _ in c.logprobs]}


def create_app(models: dict, api_key: Optional[str] = None, *, batching: str = "continuous", max_batch: int = 64,
               max_wait_ms: float = 10.0, max_cache_tokens: int = 65536, max_concurrent: int = 64,
               max_queue: int = 256, timeout_s: float = 120.0, max_tokens_cap: int = 512) -> FastAPI:
    """The server app for `models` ({name: ServedModel, or (model, tokenizer)}); run it with uvicorn."""
    if not models:
        raise LmforgeError("serve: no models to serve")
    if batching not in BATCHING:
        raise LmforgeError(f"batching: expected one of {', '.join(BATCHING)}, got {batching!r}")
    for name, value in (("max_batch", max_batch), ("max_concurrent", max_concurrent),
                        ("max_tokens_cap", max_tokens_cap), ("max_cache_tokens", max_cache_tokens)):
        if value < 1:
            raise LmforgeError(f"{name}: expected at least 1, got {value}")
    if max_queue < 0 or max_wait_ms < 0 or timeout_s <= 0:
        raise LmforgeError("max_queue and max_wait_ms must be 0 or more, timeout_s above 0")
    served = {name: m if isinstance(m, ServedModel) else ServedModel.of(name, *m) for name, m in models.items()}
    server = Server(served, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                    max_cache_tokens=max_cache_tokens, max_concurrent=max_concurrent, max_queue=max_queue,
                    timeout_s=timeout_s, max_tokens_cap=max_tokens_cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.include_router(embedding_routes(server))
    app.add_middleware(Gate, api_key=api_key, metrics=server.metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served)}

    @app.get("/metrics")
    async def metrics(format: str = "json"):
        snap = server.metrics.snapshot()
        snap["models"] = {name: {"kind": m.kind, "queued": server.engines[name].queued()
                                 if name in server.engines else 0} for name, m in served.items()}
        for name, engine in server.engines.items():
            if isinstance(engine, Scheduler) and engine.acceptance_rate() is not None:
                snap["models"][name]["draft_acceptance_rate"] = engine.acceptance_rate()
        if format == "prometheus":
            # prometheus_client loads when /metrics is first read
            from prometheus_client import CONTENT_TYPE_LATEST
            return Response(prometheus_text(snap), media_type=CONTENT_TYPE_LATEST)
        if format != "json":
            raise APIError(400, f"format: expected 'json' or 'prometheus', got {format!r}", param="format")
        return snap

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge", "task": m.kind,
                "chat": m.has_chat_template, "max_context": context_limit(m.model) if m.kind == "generate" else
                (m.max_length or None)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in served.values()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card(served[name])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        m = server.model(body.model, "generate")
        prompts = body.prompts
        rows, counts = server.plan(m, prompts, body, body.max_tokens, body.logprobs)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": m.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            release, deadline, cancel = await server.open_stream()

            def piece(i: int, text: str, finish: Optional[str] = None) -> dict:
                return {**head, "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}]}

            async def events():
                if body.echo:
                    for i, (prompt, _) in enumerate(rows):
                        yield sse(piece(i, prompt))
                done = []
                async for i, text, completion in server.stream(m, rows, cancel, deadline):
                    if completion is None:
                        yield sse(piece(i, text))
                    else:
                        done.append(completion)
                        yield sse({**piece(i, "", completion.finish_reason), **_choice_domains(completion)})
                server.count_domains(m, done)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": _usage(counts, done)})
                yield "data: [DONE]\n\n"
            return EventStream(events(), cleanup=lambda: (cancel.set(), release()))
        results = await server.run_rows(m, rows, request)
        choices = [{"text": (prompt if body.echo else "") + c.text, "index": i, "logprobs": _logprobs(c),
                    "finish_reason": c.finish_reason, **_choice_domains(c)}
                   for i, ((prompt, _), c) in enumerate(zip(rows, results))]
        return {**head, "choices": choices, "usage": _usage(counts, results), **server.count_domains(m, results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        m = server.model(body.model, "generate")
        if not m.has_chat_template:
            raise APIError(400, f"the model {m.name!r} has no chat template (its tokenizer defines none); "
                                "use /v1/completions", param="messages", code="no_chat_template")
        messages = [{"role": msg.role, "content": msg.text()} for msg in body.messages]
        try:
            prompt = m.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template rejected the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template cannot render them: {err}", param="messages") from None
        rows, counts = server.plan(m, [prompt], body, body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": m.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            release, deadline, cancel = await server.open_stream()
            chunk = {**head, "object": "chat.completion.chunk"}

            def delta(i: int, content: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
                d = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
                return {**chunk, "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}]}

            async def events():
                for i in range(len(rows)):
                    yield sse(delta(i, None, role=True))
                done = []
                async for i, text, completion in server.stream(m, rows, cancel, deadline):
                    if completion is None:
                        yield sse(delta(i, text))
                    else:
                        done.append(completion)
                        yield sse({**delta(i, None, completion.finish_reason), **_choice_domains(completion)})
                server.count_domains(m, done)
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": _usage(counts, done)})
                yield "data: [DONE]\n\n"
            return EventStream(events(), cleanup=lambda: (cancel.set(), release()))
        results = await server.run_rows(m, rows, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason, **_choice_domains(c)} for i, c in enumerate(results)]
        return {**head, "choices": choices, "usage": _usage(counts, results), **server.count_domains(m, results)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        m = server.model(body.model, "classification")
        results = await server.run_task(m, lambda: classify_texts(m.model, m.tokenizer, body.texts, body.text_pairs,
                                                                  max_length=m.max_length), request)
        return {"object": "list", "model": m.name, "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/ner")
    async def ner(body: NerRequest, request: Request):
        m = server.model(body.model, "ner")
        results = await server.run_task(m, lambda: tag_texts(m.model, m.tokenizer, list(body.texts),
                                                             max_length=m.max_length), request)
        data = [{"index": i, "entities": [{k: e[k] for k in ("type", "text", "start", "end", "score")}
                                          for e in r["entities"]], "tokens": r["tokens"], "tags": r["tags"]}
                for i, r in enumerate(results)]
        return {"object": "list", "model": m.name, "data": data}

    return app


__all__ = ["create_app", "Server"]
