"""Service settings, read from the environment (prefix `QUAVER_`) with pydantic-settings.

QUAVER_MODEL_DIR=artifacts/base QUAVER_POSTERIOR_DIR=app/default quaver serve
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.prompt import MAX_CHOICES, MIN_CHOICES
from app.thresholds import DEFAULT_MIN_COVERAGE

DEFAULT_POSTERIOR_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_EXAMPLES_DIR = Path(__file__).resolve().parent / "static" / "examples"


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="QUAVER_", env_file=None, extra="ignore")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=1, le=65535, description="port to bind")
    model_dir: Path = Field(Path("artifacts/base"), description="base model checkpoint directory")
    posterior_dir: Path = Field(DEFAULT_POSTERIOR_DIR, description="posterior directory")
    examples_dir: Path = Field(
        DEFAULT_EXAMPLES_DIR, description="example clips the page at / offers (examples.json)"
    )
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="torch device")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$", description="model dtype")
    default_samples: int = Field(8, ge=1, description="K when a request gives none")
    max_samples: int = Field(32, ge=1, description="largest K a request may ask for")
    default_max_risk: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="risk target when a request names none; unset = the lowest target the "
        "posterior's calibration guarantees with default_min_coverage answered (a default it "
        "cannot meet would abstain on everything)",
    )
    default_min_coverage: float = Field(
        DEFAULT_MIN_COVERAGE,
        ge=0,
        le=1,
        description="with default_max_risk unset: the share of the calibration split the "
        "default target must answer (0 = the lowest guaranteed target, however little it answers)",
    )
    adaptive: bool = Field(
        True, description="decide at the mean first; sample only near the threshold"
    )
    adaptive_margin: float = Field(
        0.15, ge=0, le=1, description="|confidence - threshold| that triggers sampling"
    )
    max_batch_rows: int = Field(64, ge=1, description="decoder rows (requests x K) per micro-batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a micro-batch waits to fill")
    queue_size: int = Field(64, ge=1, description="requests waiting before 503")
    request_timeout_s: float = Field(60.0, gt=0, description="per-request limit incl. queueing")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest audio upload")
    max_drain_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="an oversized body is read and discarded up to this many bytes before the 413 "
        "is sent, so that a client still sending can read it; past this the connection is closed",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body with no byte for this long gets a 408"
    )
    # -- bounds on one request's cost (app/limits.py; a violation is a 422 naming the bound) ----
    max_question_chars: int = Field(2000, ge=1, description="question length before tokenising")
    max_choice_chars: int = Field(500, ge=1, description="one choice's length before tokenising")
    max_choices: int = Field(
        MAX_CHOICES, ge=MIN_CHOICES, le=MAX_CHOICES, description="choices one question may offer"
    )
    max_question_tokens: int = Field(256, ge=1, description="question length in tokens")
    max_choice_tokens: int = Field(64, ge=1, description="one choice's length in tokens")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="whole prompt in tokens, audio block included; unset = the longest audio "
        "block + 512 text tokens, capped by the model's context window",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="decoder rows x padded tokens of one micro-batch: the engine never runs more; "
        "unset = max(max_batch_rows, max_samples) x max_prompt_tokens, so that any request the "
        "other bounds admit fits",
    )
    # -- liveness and shutdown ---------------------------------------------------------------
    watchdog_s: float = Field(
        30.0, gt=0, description="/healthz fails once the engine worker made no progress this long"
    )
    shutdown_grace_s: float = Field(
        8.0,
        gt=0,
        description="SIGTERM: in-flight requests get this long to finish, then fail with 503; "
        "the process exits 0 (below Docker's default 10 s stop timeout)",
    )
    api_key: str | None = Field(None, description="bearer token required on /answer when set")
    threads: int = Field(0, ge=0, description="torch threads (0 = torch default)")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_samples > self.max_samples:
            raise ValueError("default_samples must not exceed max_samples")
        return self
