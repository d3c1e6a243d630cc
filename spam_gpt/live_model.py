"""The model a replica answers with, and following an MLflow alias to its new versions.

With ``models:/NAME@ALIAS`` a background thread asks the registry every reload interval
where the alias points. A new version is loaded beside the answering one and takes over
in one assignment once it is ready, so a forward pass in flight finishes on the version it
started with. A version that fails to load leaves the answering one in place; the reason
is logged and shown by ``GET /model``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from spam_gpt.model_ref import alias_of, model_version_of
from spam_gpt.predictor import Predictor

logger = logging.getLogger("ray.serve")

Loaded = Callable[[Predictor, float, "str | None"], None]


class LiveModel:
    """``current`` is the predictor to answer with; read it once per forward pass."""

    def __init__(
        self,
        reference: str,
        load: Callable[[str], Predictor],
        tracking_uri: str | None = None,
        on_loaded: Loaded | None = None,
    ):
        self.reference = reference
        self.load = load
        self.tracking_uri = tracking_uri
        self.on_loaded = on_loaded
        self.alias = alias_of(reference)
        self.interval_s = 0.0  # not following until follow()
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.current = self.timed_load(reference, replaced=None)

    def timed_load(self, reference: str, replaced: str | None) -> Predictor:
        started = time.monotonic()
        predictor = self.load(reference)
        if self.on_loaded is not None:
            self.on_loaded(predictor, time.monotonic() - started, replaced)
        return predictor

    def follow(self, interval_s: float) -> None:
        """Check the alias every ``interval_s`` seconds, in a thread that ends with the
        replica's process."""
        if self.alias is None:
            raise ValueError(f"{self.reference} names no alias to follow")
        self.interval_s = interval_s

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                self.check()

        threading.Thread(target=loop, name="follow-model-alias", daemon=True).start()

    def check(self) -> None:
        """Move to the version the alias names now, if it is another and loads; a registry
        that does not answer is reported within seconds (MLflow's own retries take
        minutes)."""
        from spam_gpt.tracking import few_retries, reason_of  # MLflow: only when following

        name, alias = self.alias
        self.last_check = datetime.now(timezone.utc).isoformat(timespec="seconds")
        answering = self.current.meta.version
        try:
            with few_retries():
                _, version = model_version_of(f"models:/{name}@{alias}", self.tracking_uri)
        except Exception as error:  # the registry unreachable, the alias deleted
            self.failed(f"cannot look up models:/{name}@{alias}: {reason_of(error)}")
            return
        if version == answering:
            self.last_error = None
            return
        try:
            predictor = self.timed_load(f"models:/{name}/{version}", replaced=answering)
        except Exception as error:
            self.failed(
                f"version {version} of {name} (alias {alias}) failed to load, version "
                f"{answering} keeps answering: {error}"
            )
            return
        self.current = predictor
        self.last_error = None
        logger.info("spam-gpt: %s@%s moved, version %s answers now", name, alias, version)

    def failed(self, reason: str) -> None:
        if reason != self.last_error:  # once per distinct failure, not every interval
            logger.warning("spam-gpt: %s", reason)
        self.last_error = reason

    def status(self) -> dict | None:
        """What ``GET /model`` says about following, or None for a fixed model."""
        if self.alias is None:
            return None
        return {
            "alias": f"models:/{self.alias[0]}@{self.alias[1]}",
            "reload_interval_s": self.interval_s,
            "last_check": self.last_check,
            "last_error": self.last_error,
        }
