"""The launcher's own series: engine state, restarts and the standby's answers.

Why this exists: while vLLM loads or restarts, nothing of vLLM answers
``/metrics``. If the standby answered it with 503 like every other path,
Prometheus would see ``up == 0`` for the whole model load, and an alert on
``up`` could not tell "the process is gone" from "the model is loading". So
the launcher keeps these series itself and serves them on two doors:

* while vLLM is down, the standby (:mod:`refusal_gateway.standby`) answers
  ``GET /metrics`` with them (HTTP 200), so ``up`` stays 1 and
  ``refusal_gateway_engine_up`` says 0;
* while vLLM serves, vLLM's own ``/metrics`` carries them too: the launcher
  writes its exposition to a small file whenever the engine state changes
  (path in :data:`STATE_FILE_ENV`), and :func:`register_launcher_series`
  adds a collector to vLLM's registry that re-exports that file. Counters
  therefore continue across the switch (same process, same values).

Limitation: with several API-server processes vLLM exports its
multiprocess collector only, which ignores custom collectors, so there the
launcher series are visible while the engine is down but not while it serves.

Label values are bounded: the served model name and the fixed vocabularies
below.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

#: Environment variable naming the file the launcher writes its series to.
STATE_FILE_ENV = "REFUSAL_GATEWAY_LAUNCHER_METRICS_FILE"

#: Engine states (label ``state`` of ``refusal_gateway_engine_state``):
#: ``starting`` (first load), ``serving`` (healthy), ``restarting`` (after an
#: exit: back-off or reloading), ``stopping`` (the launcher was told to stop).
ENGINE_STATES = ("starting", "serving", "restarting", "stopping")
#: Why the standby answered 503 (label ``reason``): the engine state at the time.
STANDBY_REASONS = ("starting", "restarting", "stopping")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class LauncherMetrics:
    """The launcher's collectors, in a registry of their own (the launcher process).

    Thread-safe: the supervisor thread, the health watcher and the standby's
    answer threads all update it.
    """

    def __init__(self, model: str, state_file: Path | None = None):
        self.model = model
        self.state_file = state_file
        self.registry = CollectorRegistry()
        # Reentrant: the launcher's SIGTERM handler sets the state, and the
        # signal may arrive while the main thread holds the lock.
        self._lock = threading.RLock()
        self.state = "starting"
        self.engine_up = Gauge(
            "refusal_gateway_engine_up",
            "1 while this replica's vLLM engine is healthy and serving, 0 while it loads, "
            "restarts or stops (the launcher itself answers /metrics meanwhile).",
            ["model"],
            registry=self.registry,
        )
        self.engine_state = Gauge(
            "refusal_gateway_engine_state",
            "The launcher's view of the engine, one-hot by state "
            "(starting, serving, restarting, stopping).",
            ["model", "state"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "refusal_gateway_engine_restarts",
            "vLLM processes the launcher started again after one exited.",
            ["model"],
            registry=self.registry,
        )
        self.standby_responses = Counter(
            "refusal_gateway_standby_responses",
            "Requests the launcher's standby answered with 503 while vLLM was not serving, "
            "by reason (the engine state: starting, restarting, stopping).",
            ["model", "reason"],
            registry=self.registry,
        )
        # Every label set exists from the start (at 0), so rules and panels
        # have data before the first restart or the first 503.
        self.restarts.labels(model=model)
        for reason in STANDBY_REASONS:
            self.standby_responses.labels(model=model, reason=reason)
        self._apply_state("starting")

    def set_state(self, state: str) -> None:
        """Record an engine state change and publish it for vLLM's ``/metrics``."""
        if state not in ENGINE_STATES:
            raise ValueError(f"unknown engine state {state!r}; states: {ENGINE_STATES}")
        with self._lock:
            self._apply_state(state)
        self.write_state_file()

    def restarted(self) -> None:
        """One more vLLM process started after an exit."""
        self.restarts.labels(model=self.model).inc()
        self.write_state_file()

    def standby_answered(self) -> None:
        """The standby answered one request with 503; the reason is the current state."""
        with self._lock:
            reason = self.state if self.state in STANDBY_REASONS else "restarting"
        self.standby_responses.labels(model=self.model, reason=reason).inc()

    def exposition(self) -> bytes:
        """The series in Prometheus' text format (what the standby serves)."""
        return generate_latest(self.registry)

    def write_state_file(self) -> None:
        """Atomically replace the state file (a no-op without one).

        Written on state changes only, not on every standby answer: while the
        standby answers, it serves the live values itself; the switch to
        ``serving`` writes everything counted until then.
        """
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            with self._lock:
                tmp.write_bytes(self.exposition())
                os.replace(tmp, self.state_file)
        except OSError:
            logger.warning(
                "could not write the launcher metrics to %s", self.state_file, exc_info=True
            )

    def _apply_state(self, state: str) -> None:
        self.state = state
        for name in ENGINE_STATES:
            self.engine_state.labels(model=self.model, state=name).set(1 if name == state else 0)
        self.engine_up.labels(model=self.model).set(1 if state == "serving" else 0)


class LauncherSeriesCollector:
    """Re-exports the launcher's state file inside vLLM's API-server process."""

    def __init__(self, path: Path):
        self.path = path

    def describe(self) -> list[Metric]:
        # Nothing to check for duplicates at registration: the file may not
        # exist yet, and its names never clash with vLLM's or the layer's.
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return []  # the launcher has not written it (yet); export nothing
        try:
            return list(text_string_to_metric_families(text))
        except ValueError:
            logger.warning("unreadable launcher metrics in %s", self.path)
            return []


def register_launcher_series(
    registry: CollectorRegistry, environ: dict[str, str] | None = None
) -> LauncherSeriesCollector | None:
    """Add the launcher's series to ``registry`` when the launcher named a state file."""
    path = (os.environ if environ is None else environ).get(STATE_FILE_ENV)
    if not path:
        return None
    collector = LauncherSeriesCollector(Path(path))
    registry.register(collector)
    return collector
