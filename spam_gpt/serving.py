"""The classification endpoint: a Ray Serve deployment behind a FastAPI ingress.

Concurrent ``POST /classify`` requests share forward passes (:mod:`spam_gpt.batching`):
one that finds the model idle starts at once, those that arrive during a pass form the
next. Every malformed request is answered with a 4xx that says what was wrong, before it
reaches the model. With API keys, classifying and ``/model`` need ``Authorization: Bearer
KEY``; ``/healthz``, the page and the API docs stay open.

No ``from __future__ import annotations`` here: FastAPI must see the request models as
classes, not strings, through Serve's ingress wrapper.
"""

import asyncio
import email.message
import json
import logging
import math
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from spam_gpt.api_keys import KEYS_VARIABLE, KeyCheck, read_api_keys
from spam_gpt.api_models import (
    MAX_BODY_BYTES,
    BatchRequest,
    BatchResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
)
from spam_gpt.batching import PassBatcher
from spam_gpt.gates import BodyLimit, CrossOrigin, KeyGate, check_origins

logger = logging.getLogger("ray.serve")

# Requests per forward pass; each replica applies its own.
MAX_BATCH_SIZE = 32
RELOAD_INTERVAL_S = 30.0


# The field of the other route, sent to this one: where it belongs.
OTHER_ROUTE = {
    "texts": " (several messages go to POST /classify/batch)",
    "text": " (one message goes to POST /classify)",
}


def describe_errors(error: RequestValidationError) -> str:
    """One readable line: where each problem is and what it is."""
    parts = []
    for item in error.errors():
        if item.get("type") == "json_invalid":  # its location is a character offset
            why = item.get("ctx", {}).get("error", "invalid")
            parts.append(f"the body is not valid JSON: {why} at character {item['loc'][-1]}")
            continue
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        hint = OTHER_ROUTE.get(where, "") if item.get("type") == "extra_forbidden" else ""
        parts.append(f"{where}: {item.get('msg', 'invalid')}{hint}")
    return "; ".join(parts)


BEARER = "HTTPBearer"
KEY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API key, when the endpoint was started with keys "
    "(--api-key-file or SPAM_GPT_API_KEYS)",
}
# The paths that need a key: KeyGate refuses them without one, and the schema says so.
KEYED_PATHS = frozenset({"/classify", "/classify/batch", "/model"})


class KeyedAPI(FastAPI):
    """FastAPI whose schema names the bearer scheme that :class:`KeyGate` enforces on
    KEYED_PATHS (FastAPI lists the schemes of dependencies only)."""

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = (
                KEY_SCHEME
            )
            for path in KEYED_PATHS:
                for operation in schema["paths"][path].values():
                    operation["security"] = [{BEARER: []}]
        return self.openapi_schema


api = KeyedAPI(
    title="spam-gpt",
    description="Classify SMS messages with a fine-tuned GPT-2 (spam or not spam, or the "
    "labels the model was trained on).",
    version="1.0",
)
# Added before the routes' class, whose ingress freezes a copy of the app. The last added
# runs first: CORS preflights are answered before anything else looks at a request, and
# an oversized body is drained for its 413 before the key gate answers.
api.add_middleware(KeyGate, protected=KEYED_PATHS, key_check=lambda: api.state.key_check)
api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
api.add_middleware(CrossOrigin, origins=lambda: api.state.allowed_origins)

REFUSALS = {
    401: {"model": ErrorResponse, "description": "no API key, or a wrong one"},
    413: {"model": ErrorResponse, "description": f"body over {MAX_BODY_BYTES:,} bytes"},
    415: {"model": ErrorResponse, "description": "a body not sent as application/json"},
    422: {"model": ErrorResponse, "description": "the body is not a valid request"},
}


def json_safe(value):
    """``value`` as a JSON answer can carry it. Python's JSON reader accepts what JSON
    cannot say (NaN, infinities, lone surrogates in ``\\ud800`` escapes), and an answer
    that echoes the client's input must not fail on them: numbers become text, lone
    surrogates U+FFFD."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON: application/json or
    application/*+json (with no type, it does not: its strict content type)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type")
    if not is_json(content_type):  # `curl -d` sends a form's type: the body went unread
        sent = repr(content_type) if content_type else "none"
        return JSONResponse(
            status_code=415,
            content={
                "error": "send the body as JSON with the header Content-Type: "
                f"application/json (this request's Content-Type: {sent})"
            },
        )
    detail = json.loads(json.dumps(error.errors(), default=str))
    return JSONResponse(
        status_code=422,
        content=json_safe({"error": describe_errors(error), "detail": detail}),
    )


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's refusals (unknown path, method, unreadable body) in the
    shape of every other error: ``error`` says what to do. ``OPTIONS`` on a path that
    exists says what it takes (HAProxy's default health check is ``OPTIONS /``)."""
    if error.status_code == 405 and request.method == "OPTIONS":
        allowed = (error.headers or {}).get("Allow", "").replace(" ", "").split(",")
        methods = sorted({*allowed, "OPTIONS"} - {""})  # Starlette's order varies by run
        return Response(status_code=204, headers={"Allow": ", ".join(methods)})
    where = f"{request.method} {request.url.path}"
    reasons = {
        400: "the body is not readable JSON (it must be UTF-8, uncompressed, and nested "
        "less deeply); see /docs for the requests this endpoint takes",
        404: f"nothing answers {where}; see /docs for the paths this endpoint serves",
        405: f"{where} is not allowed; {request.url.path} takes "
        f"{(error.headers or {}).get('Allow', 'other methods')} (see /docs)",
    }
    return JSONResponse(
        status_code=error.status_code,
        content={
            "error": reasons.get(error.status_code, str(error.detail)),
            "detail": error.detail,
        },
        headers=error.headers,
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
        threads: int = 1,
        device: str = "cpu",
        api_key_file: str | None = None,
        reload_interval_s: float = RELOAD_INTERVAL_S,
        allow_origins: list[str] | None = None,
    ):
        import torch

        from spam_gpt.live_model import LiveModel
        from spam_gpt.model_ref import load_predictor
        from spam_gpt.serve_metrics import ServeMetrics

        torch.set_num_threads(threads)
        self.keys = KeyCheck(read_api_keys(api_key_file))
        api.state.key_check = self.keys
        api.state.allowed_origins = check_origins(allow_origins or [])
        if not self.keys.required:
            logger.warning(
                "spam-gpt: no API keys, the endpoint answers anyone who reaches it "
                f"(--api-key-file or {KEYS_VARIABLE} to require keys)"
            )
        self.metrics = ServeMetrics()

        def load(reference: str):
            return load_predictor(
                reference, tracking_uri, precision=precision, device=device, compile_int8=True
            )

        def loaded(predictor, seconds: float, replaced: str | None) -> None:
            meta = predictor.meta
            self.metrics.loaded(meta.name, meta.version, seconds, replaced)

        self.model = LiveModel(model, load, tracking_uri, on_loaded=loaded)
        if self.model.alias is not None and reload_interval_s > 0:
            self.model.follow(reload_interval_s)
        self.batcher = PassBatcher(self.responses, max_batch_size) if max_batch_size > 1 else None

    def responses(self, texts: list[str]) -> list[ClassifyResponse]:
        """One forward pass, on the version answering when it starts."""
        predictor = self.model.current
        predictions = predictor.predict(texts)
        info = ModelInfo(name=predictor.meta.name, version=predictor.meta.version)
        self.metrics.answered([p.label for p in predictions], info.version)
        return [
            ClassifyResponse(
                label=p.label,
                probability=p.probability,
                probabilities=p.probabilities,
                spam_probability=p.spam_probability,
                model=info,
            )
            for p in predictions
        ]

    @api.post(
        "/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses=REFUSALS,
    )
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """Label one message; concurrent calls share a forward pass."""
        if self.batcher is None:  # --no-batching: one message per pass, on the event loop
            return self.responses([request.text])[0]
        return await self.batcher.submit(request.text)

    @api.post(
        "/classify/batch",
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses=REFUSALS,
    )
    async def classify_batch(self, request: BatchRequest) -> BatchResponse:
        """Label up to 256 messages (MAX_TEXTS), answered in input order."""
        # Off the event loop: a large batch must not hold up single requests or health checks.
        return BatchResponse(predictions=await asyncio.to_thread(self.responses, request.texts))

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict:
        """200 once the model is loaded (the replica answers only after loading it); open
        to load balancers even when the endpoint needs API keys."""
        return {"status": "ok", "api_keys": "required" if self.keys.required else "open"}

    @api.get("/model", responses={401: REFUSALS[401]})
    async def model(self) -> dict:
        """Which model answers, how it was trained, how it scored, and whether the
        endpoint follows an alias to new versions."""
        meta = self.model.current.meta
        return {
            "reference": self.model.reference,
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
            "following": self.model.status(),
        }

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` configs.

    ``args`` keys: model (required), tracking_uri, precision, max_batch_size, threads,
    replicas or min_replicas/max_replicas, gpu, max_ongoing_requests (per replica, default
    64), api_key_file (a path on every node, such as a mounted secret), reload_interval_s
    (how often a ``models:/NAME@ALIAS`` model checks its alias; 0: never), allow_origins
    (browser origins that may call the endpoint, CORS; ``["*"]``: any).
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("the serve config needs args.model (a checkpoint or MLflow reference)")
    check_origins(args.get("allow_origins") or [])  # here, not in every replica
    if args.pop("batch_wait_timeout_s", None) is not None:
        logger.warning(
            "spam-gpt: batch_wait_timeout_s is no longer used (batches form while a pass "
            "runs, with no wait); remove it from the config"
        )
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
