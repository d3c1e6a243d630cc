"""The classification endpoint: a Ray Serve deployment behind a FastAPI ingress.

Concurrent ``POST /classify`` requests meet in ``@serve.batch`` and share one forward
pass. Every malformed request is answered with a 4xx that says what was wrong, before it
reaches the model: the replica never sees bad input.

No ``from __future__ import annotations`` here: FastAPI must see the request models as
classes, not strings, through Serve's ingress wrapper.
"""

import asyncio
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from ray import serve

MAX_BODY_BYTES = 1_000_000
MAX_TEXTS = 256
MAX_TEXT_CHARS = 100_000
# Requests per forward pass and how long a batch waits to fill; each replica applies its own.
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.01


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(max_length=MAX_TEXT_CHARS, description="the message to classify")

    @field_validator("text")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty")
        return text


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, max_length=MAX_TEXTS)

    @field_validator("texts")
    @classmethod
    def none_blank(cls, texts: list[str]) -> list[str]:
        blank = [i for i, text in enumerate(texts) if not text.strip()]
        if blank:
            raise ValueError(f"texts {blank[:10]} are empty")
        too_long = [i for i, text in enumerate(texts) if len(text) > MAX_TEXT_CHARS]
        if too_long:
            raise ValueError(f"texts {too_long[:10]} exceed {MAX_TEXT_CHARS} characters")
        return texts


class ModelInfo(BaseModel):
    name: str
    version: str


class ClassifyResponse(BaseModel):
    label: str = Field(description="the most probable label")
    probability: float = Field(description="that label's probability")
    probabilities: dict[str, float] = Field(description="every label's probability")
    spam_probability: float | None = Field(
        default=None, description="P(spam), for models whose labels are spam and one other"
    )
    model: ModelInfo


class BatchResponse(BaseModel):
    predictions: list[ClassifyResponse]


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, before parsing."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self.reject(send, 413 if declared.isdigit() else 400)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self.reject(send, 413)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def reject(self, send, status: int) -> None:
        reason = (
            f"request body exceeds {self.limit:,} bytes"
            if status == 413
            else "Content-Length is not a number"
        )
        payload = json.dumps({"error": reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def describe_errors(error: RequestValidationError) -> str:
    """One readable line: where each problem is and what it is."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


api = FastAPI(
    title="spam-gpt",
    description="Classify SMS messages with a fine-tuned GPT-2 (spam or not spam, or the "
    "labels the model was trained on).",
    version="1.0",
)
api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "error": describe_errors(error),
            "detail": json.loads(json.dumps(error.errors(), default=str)),
        },
    )


PAGE = resources.files("spam_gpt").joinpath("web", "index.html").read_text(encoding="utf-8")


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SpamClassifierService:
    def __init__(
        self,
        model: str,
        tracking_uri: str | None = None,
        precision: str = "fp32",
        max_batch_size: int = MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S,
        threads: int = 1,
        device: str = "cpu",
    ):
        import torch

        from spam_gpt.model_ref import load_predictor

        torch.set_num_threads(threads)
        self.predictor = load_predictor(model, tracking_uri, precision=precision, device=device)
        self.reference = model
        self.info = ModelInfo(name=self.predictor.meta.name, version=self.predictor.meta.version)
        self.classify_many.set_max_batch_size(max_batch_size)
        self.classify_many.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def responses(self, texts: list[str]) -> list[ClassifyResponse]:
        return [
            ClassifyResponse(
                label=p.label,
                probability=p.probability,
                probabilities=p.probabilities,
                spam_probability=p.spam_probability,
                model=self.info,
            )
            for p in self.predictor.predict(texts)
        ]

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def classify_many(self, texts: list[str]) -> list[ClassifyResponse]:
        """One forward pass for the requests that met here, run on the event loop on
        purpose: Serve forms the next batch whenever the loop is free, so a model running
        off the loop would see the waiting requests cut into many small batches (measured
        at concurrency 32 on gpt2-small, batches of up to 16: 4 requests per pass)."""
        return self.responses(texts)

    @api.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """Label one message; concurrent calls share a forward pass."""
        return await self.classify_many(request.text)

    @api.post("/classify/batch", response_model=BatchResponse, response_model_exclude_none=True)
    async def classify_batch(self, request: BatchRequest) -> BatchResponse:
        """Label up to 256 messages, answered in input order."""
        # Off the event loop: a large batch must not hold up single requests or health checks.
        return BatchResponse(predictions=await asyncio.to_thread(self.responses, request.texts))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 once the model is loaded: the replica answers only after loading it."""
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> dict:
        """Which model answers, how it was trained, and how it scored."""
        meta = self.predictor.meta
        return {
            "reference": self.reference,
            "name": meta.name,
            "version": meta.version,
            "config": {
                "model": meta.model_config,
                "token": meta.token,
                "padding": meta.padding,
                "max_length": meta.max_length,
                "training": meta.train_config,
            },
            "labels": meta.labels,
            "test_accuracy": meta.metrics.get("test_accuracy"),
            "metrics": meta.metrics,
        }

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` configs.

    ``args`` keys: model (required), tracking_uri, precision, max_batch_size,
    batch_wait_timeout_s, threads, replicas or min_replicas/max_replicas, gpu,
    max_ongoing_requests (per replica, default 64).
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("the serve config needs args.model (a checkpoint or MLflow reference)")
    replicas = args.pop("replicas", None)
    bounds = (args.pop("min_replicas", None), args.pop("max_replicas", None))
    gpu = bool(args.pop("gpu", False))
    threads = int(args.get("threads", 1))
    options: dict = {
        "ray_actor_options": {"num_cpus": threads, "num_gpus": 1 if gpu else 0},
        # Serve's default (5 requests in flight per replica) would cap every batch at 5.
        "max_ongoing_requests": int(args.pop("max_ongoing_requests", 64)),
    }
    if bounds != (None, None):
        low, high = bounds[0] or 1, bounds[1] or max(bounds[0] or 1, 1)
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    else:
        options["num_replicas"] = int(replicas or 1)
    return SpamClassifierService.options(**options).bind(**args, device="cuda" if gpu else "cpu")
