"""Every knob of refusal-gateway, in one pydantic-settings model.

Sources, highest precedence first: CLI flags of ``refusal-gateway serve``
(generated from the fields below), environment variables
``REFUSAL_GATEWAY_<FIELD>``, then the defaults. The launcher resolves the
settings once and hands them to the vLLM process as environment variables, so
the middleware inside vLLM (which vLLM builds with no arguments) reads the
very same model.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "REFUSAL_GATEWAY_"
#: A file the launcher creates when it starts draining (path in this variable, for
#: vLLM's processes): from then on the layer admits no new generation request.
DRAIN_FILE_ENV = ENV_PREFIX + "DRAIN_FILE"
#: A file the layer creates, in vLLM's API server, when the app's startup is complete and
#: just before that server starts accepting on the shared socket (path in this variable):
#: from then on the launcher's standby leaves every connection to vLLM. Without it the
#: standby went on taking connections until the launcher's next /health poll (up to 1 s),
#: and a client that had already seen vLLM's /health answer 200 could get the standby's 503.
SERVING_FILE_ENV = ENV_PREFIX + "SERVING_FILE"
DEMO_MODEL = "demo"
#: What ``refusal-gateway serve`` serves when no model is named (README, Quality).
DEFAULT_MODEL = "smollm2"
#: Models the training kit builds (once, cached) when named instead of a directory:
#: name -> served model name. The launcher asks the kit for the path in a child
#: process (``python -m refusal_training.build NAME``), so serving imports none of it.
BUILT_MODELS: dict[str, str] = {DEFAULT_MODEL: "refusal-smollm2", DEMO_MODEL: "refusal-demo"}


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "refusal-gateway"


class GatewaySettings(BaseSettings):
    """Settings of the launcher and of the gateway layer inside vLLM."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="Refusal-token model directory (with refusal_manifest.json), or a model "
        "the training kit builds on first use: 'smollm2' (the default: SmolLM2-135M-Instruct "
        "with a fitted decision head) or 'demo' (the tiny test model).",
    )
    served_model_name: str | None = Field(
        None,
        description="Model name clients use; default 'refusal-smollm2' / 'refusal-demo' for "
        "the built models, else the model directory's name.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    refusal_content: Literal["null", "copy"] = Field(
        "null",
        description="What 'content' holds when a choice is refused: 'null' (OpenAI's shape, "
        "the text is only in 'refusal') or 'copy' (the text in both).",
    )
    policy_file: Path | None = Field(
        None,
        description="YAML/JSON policy file: refusal profiles and API keys with bounds "
        "(see refusal_gateway.policy). Identical on every replica.",
    )
    model_runner: Literal["auto", "v1", "v2"] = Field(
        "auto",
        description="vLLM model runner, and so which processor class is loaded: 'auto' "
        "(V2 on CUDA, V1 elsewhere), 'v1' or 'v2'.",
    )
    dtype: str | None = Field(
        None,
        description="vLLM --dtype; default: what the model's manifest declares (float32 for "
        "the built-in models, the saved dtype for train's), vLLM's own otherwise.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the demo model is built and cached.",
    )
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE) if not set."
    )
    max_restarts: int = Field(
        5,
        ge=0,
        description="Restarts in a row that fail to bring vLLM back healthy before the launcher "
        "gives up (a crash loop of a broken setup); a server that was healthy is always "
        "restarted when it dies.",
    )
    restart_backoff_s: float = Field(
        2.0, gt=0, description="First restart delay in seconds; doubles per restart, up to 60."
    )
    retry_after_s: int = Field(
        5,
        ge=1,
        description="Retry-After (seconds) of the 503 answers the launcher gives while vLLM "
        "is starting or restarting.",
    )
    decision_report_wait_s: float = Field(
        0.2,
        ge=0,
        description="How long a response may wait for the engine's decision report (the "
        "model's own control-token probabilities) before it says 'unknown'.",
    )
    canary_interval_s: float = Field(
        300.0,
        ge=0,
        description="Seconds between rounds of the over-refusal canary (the packaged canary "
        "prompts, sent through the server with max_tokens 1); 0 turns it off.",
    )
    canary_file: Path | None = Field(
        None,
        description="JSONL canary prompts (prompt, label respond|refuse); default: the "
        "packaged set.",
    )
    canary_profile: str | None = Field(
        None, description="Refusal profile the canary requests use (default: the server's)."
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/SIGINT, how long in-flight requests may take to finish (vLLM "
        "--shutdown-timeout: no new request is admitted meanwhile) before vLLM is stopped; "
        "whatever is left 30 s after that is killed.",
    )

    max_inflight_requests: int = Field(
        1024,
        ge=0,
        description="Generation requests one API-server process admits at once; beyond it "
        "the layer answers 503 + Retry-After instead of queueing without bound (0: no limit).",
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="Largest request body the layer reads (413 beyond it; 0: no limit).",
    )

    def model_dir(self) -> Path:
        """The model directory; a built model's name is resolved by the launcher.

        The launcher hands vLLM's processes the resolved directory (the
        environment's ``REFUSAL_GATEWAY_MODEL``), so the layer never meets a name.
        """
        if self.model in BUILT_MODELS:
            raise ValueError(
                f"model {self.model!r} is built by the training kit; the launcher resolves "
                "it (refusal-gateway serve, or refusal-gateway build-model)"
            )
        return Path(self.model).expanduser().resolve()

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return BUILT_MODELS.get(self.model) or Path(self.model).name

    def to_env(self) -> dict[str, str]:
        """The settings as environment variables for the vLLM process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        return env


def _arg_type(annotation: Any) -> tuple[Any, list[str] | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if args:
        return _arg_type(args[0])
    return (annotation if annotation in (int, float, str, Path) else str), None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per settings field, with the field's description as help."""
    for name, field in GatewaySettings.model_fields.items():
        arg_type, choices = _arg_type(field.annotation)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=arg_type,
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}]",
        )


def settings_from_args(namespace: argparse.Namespace) -> GatewaySettings:
    given = {k: v for k, v in vars(namespace).items() if k in GatewaySettings.model_fields}
    return GatewaySettings(**given)
