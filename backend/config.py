"""The one Settings class: the only place the environment (and .env) is read."""

from __future__ import annotations

import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data")
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"


# A production token is guessed by no one: 32 characters at least (`make env` writes 43).
MIN_ADMIN_TOKEN_LENGTH = 32
GENERATE_HINT = (
    "`make env` writes both into .env; a key alone: python -c 'from cryptography.fernet "
    "import Fernet; print(Fernet.generate_key().decode())'"
)


class UnsafeSettingsError(RuntimeError):
    """Raised at start-up when a setting that production needs is missing."""


class Settings(BaseSettings):
    # An empty value (`IMAP_CA_BUNDLE=` copied from .env.example) means "not set", not
    # Path("."), which would break TLS.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    environment: Literal["development", "test", "production"] = "development"
    log_level: str = "INFO"
    data_dir: Path = DEFAULT_DATA_DIR

    # Database: the source of truth. SQLite for a laptop, PostgreSQL in production.
    database_url: str = f"sqlite:///{DEFAULT_DATA_DIR}/mailbeat.db"
    database_pool_size: int = 5

    # Redis: broker, locks and the RedBeat schedule. Unreachable means local mode.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redbeat_redis_url: str | None = None  # defaults to redis_url
    redis_socket_timeout: float = 5.0
    # Redis Sentinel (REDIS_URL `sentinel://host1:26379;sentinel://host2:26379/0`): the
    # name the sentinels know the master by; each question to a sentinel gives up after
    # REDIS_SENTINEL_TIMEOUT; a call that cannot reach the master (it is being failed over)
    # tries again for REDIS_SENTINEL_FAILOVER_SECONDS before it fails.
    redis_sentinel_master: str | None = None
    redis_sentinel_timeout: float = Field(default=1.0, gt=0)
    redis_sentinel_failover_seconds: float = Field(default=30.0, ge=0)
    # auto: Celery + RedBeat when Redis answers, else the in-process scheduler.
    scheduler_mode: Literal["auto", "celery", "local"] = "auto"

    # Secrets. ENCRYPTION_KEY may be a comma-separated list of Fernet keys: the first
    # encrypts, all decrypt, which is how a key is rotated (see backend/crypto.py).
    admin_api_token: SecretStr | None = None
    encryption_key: SecretStr | None = None

    # The admin API's own exposure. A request body over this many bytes is a 413.
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # /docs, /redoc and /openapi.json without a token; unset: yes, except in production.
    api_docs_public: bool | None = None
    # Slow clients (backend/serving.py): a connection is closed when its request's headers
    # take longer than this from the connection opening (or a kept-alive request's first
    # byte), or its body longer than this after the headers.
    request_header_timeout_seconds: float = Field(default=10.0, gt=0)
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)

    # Outbound connections (IMAP servers, webhook receivers, OAuth token URLs) are named by
    # API callers. Unset: loopback, link-local, private, multicast and reserved addresses
    # are refused in production and allowed elsewhere. OUTBOUND_ALLOWLIST names internal
    # hosts and networks allowed anyway: comma-separated CIDRs and host names.
    outbound_allow_private: bool | None = None
    outbound_allowlist: str = ""

    # Object storage (S3 / Aliyun OSS / MinIO). Unset bucket means local files only.
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 30.0
    s3_max_attempts: int = 3
    # A write (one attempt) fails when no byte moves for this long; it goes to local files.
    s3_write_timeout_seconds: float = Field(default=5.0, gt=0)
    # After a failed S3 write, writes go straight to local files for this long, in every
    # process (the state is shared through Redis).
    s3_retry_after_seconds: float = 30.0
    local_storage_dir: Path = DEFAULT_DATA_DIR / "storage"
    storage_sync_interval_seconds: int = 300

    # IMAP.
    imap_ca_bundle: Path | None = None
    imap_connect_timeout: float = 15.0
    imap_read_timeout: float = 60.0
    # 200: a first sync's fixed costs per batch (a commit, fsyncs) spread over more
    # messages; bytes per batch are bounded apart (BATCH_MAX_BYTES).
    imap_fetch_batch_size: int = Field(default=200, ge=1, le=1000)
    # Logged-in sessions each worker process keeps for the next poll of the same mailbox.
    imap_pool_size: int = Field(default=4, ge=0, le=10000)
    imap_pool_max_age_seconds: float = Field(default=300, gt=0)
    # How long a server's folder list (LIST) is kept for an account whose `folders` name
    # special uses (\Sent) or `*`: a folder created later is polled within this.
    folder_list_seconds: float = Field(default=300, ge=0)
    # What mailbeat tells the server about itself after login (RFC 2971 ID, a JSON
    # object). NetEase (163, 126, yeah.net) refuses every folder to a client that has not
    # sent ID. `{}` sends none.
    imap_id: dict[str, str] = Field(
        default_factory=lambda: {"name": "mailbeat", "version": "0.1.0", "vendor": "mailbeat"}
    )
    # Connections to one IMAP host, in all, from every process (polls, kept sessions,
    # backfills, audits, watchers): a JSON object of host -> limit that overrides the
    # provider table's (backend/mailbox/providers.py), e.g. {"imap.example.org": 20}.
    connection_limits: dict[str, int] = Field(default_factory=dict)
    # A connection's slot in the budget lasts this long unless renewed (every third of
    # it) by the process holding it: a dead process's slots are free within this.
    connection_slot_seconds: float = Field(default=30.0, ge=1)
    # How long a poll waits for a slot before it gives up (outcome no_slot) and is sent
    # again this much later; never a failure of the mailbox.
    connection_slot_wait_seconds: float = Field(default=30.0, ge=0)
    max_message_bytes: int = 50 * 1024 * 1024
    # An attachment of at most this many decoded bytes is kept only inside the raw
    # message and decoded from it when asked for (one object per message, not one per
    # part: a first sync's fsyncs are its bound); larger ones are objects of their own.
    # 0: every attachment is its own object.
    attachment_inline_max_bytes: int = Field(default=1024 * 1024, ge=0)
    # Processes per poll worker process that parse large batches (0: in the poll).
    parse_processes: int = Field(default=2, ge=0, le=64)
    # The charset of raw 8-bit header bytes that are not UTF-8, when the message's first
    # text part names none (docs/architecture.md, "Decoding"). A label of the WHATWG
    # Encoding Standard; a mostly Chinese mailbox sets gb18030.
    header_fallback_charset: str = "windows-1252"

    # Polling and scheduling.
    default_poll_interval_seconds: int = 300
    min_poll_interval_seconds: int = 10
    max_poll_interval_seconds: int = 7 * 24 * 3600
    backoff_max_seconds: int = 3600
    max_consecutive_failures: int = 10
    # A poll the provider throttled (not a failure: never disables) tries again after the
    # wait the server named, at most THROTTLE_BACKOFF_MAX_SECONDS, or this when it named none.
    throttle_backoff_seconds: int = Field(default=60, ge=1)
    throttle_backoff_max_seconds: int = Field(default=900, ge=1)
    reconcile_interval_seconds: int = 300
    # A poll closes its IMAP connection at this age, whatever the server is doing (a
    # body trickled a byte at a time never trips IMAP_READ_TIMEOUT); below the soft limit.
    poll_deadline_seconds: float = Field(default=540, gt=0)
    poll_soft_time_limit_seconds: int = 600
    poll_time_limit_seconds: int = 660
    # A poll's hold on its mailbox (a lease in Redis) lasts this long unless renewed; the
    # polling process renews it every third of it for as long as the poll runs, so a
    # poll whose worker died frees its mailbox within it (docs/operations.md, "Crashes").
    mailbox_lease_seconds: float = Field(default=20.0, ge=1)
    # /health says "degraded" when the oldest queued poll has waited longer than this:
    # the workers complete fewer polls than the schedule asks for.
    poll_lag_degraded_seconds: int = Field(default=300, ge=1)
    # Finished poll runs are deleted this long after they finished, every 10 minutes
    # (100,000 mailboxes every 5 minutes make about 29 million a day).
    poll_run_retention_days: int = Field(default=14, ge=1)
    # Change tracking on servers without CONDSTORE (backend/mailbox/changes.py): every
    # poll compares the flags of a folder's newest CHANGES_WINDOW messages, and every
    # CHANGES_FULL_CHECK_SECONDS all of them and the whole UID set (deletions; sooner
    # when STATUS's counts show an expunge). Servers with QRESYNC need neither.
    changes_window: int = Field(default=200, ge=0)
    changes_full_check_seconds: int = Field(default=3600, ge=1)

    # Freshness (backend/audit/freshness.py): a scheduled mailbox with no complete poll for
    # FRESHNESS_INTERVALS times its interval, and at least FRESHNESS_FLOOR_SECONDS, is
    # stale (in /health, capacity, metrics and the console; account.stale sent once).
    freshness_intervals: float = Field(default=3.0, ge=1)
    freshness_floor_seconds: int = Field(default=900, ge=0)
    # Audits (backend/audit/service.py): each scheduled mailbox is audited once per
    # AUDIT_INTERVAL_SECONDS, spread over the interval (0: only on demand); AUDIT_DEEP
    # makes the scheduled ones read every object and compare its hash too.
    audit_interval_seconds: int = Field(default=86400, ge=0)
    audit_deep: bool = False

    # Push (the watcher, `cli watch`): IDLE connections for accounts with push on.
    # Connections one watcher holds at most, in all and to one IMAP host (a provider's
    # per-address limit; Gmail allows 15 per user).
    watcher_max_connections: int = Field(default=2000, ge=1)
    watcher_max_per_host: int = Field(default=500, ge=1)
    # A watcher's claim on a mailbox (a fenced lease in Redis) lasts this long unless
    # renewed (every third of it): a dead watcher's mailboxes move within this time.
    watcher_lease_seconds: float = Field(default=10.0, ge=1)
    # IDLE is ended and issued again this often: servers drop an IDLE after 29 minutes.
    watcher_idle_seconds: float = Field(default=1500.0, gt=0)
    # Threads that log in (and select) new connections; the waiting itself is one thread.
    watcher_login_threads: int = Field(default=8, ge=1, le=256)
    # Held checks (backend/push/held.py): a watcher keeps a logged-in session for every
    # mailbox polled at most this often (0: none), asks its folders' STATUS on it at the
    # mailbox's interval and sends a poll only when something changed; beat then sends
    # such a mailbox a poll only every HELD_SAFETY_INTERVAL_SECONDS, as long as its
    # checks keep coming. A check is written to the account (last poll, last success) at
    # most every HELD_RECORD_SECONDS per mailbox.
    held_interval_max_seconds: int = Field(default=60, ge=0)
    held_safety_interval_seconds: int = Field(default=900, ge=1)
    held_record_seconds: float = Field(default=60.0, gt=0)

    # Webhooks (processing).
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_timeout_seconds: float = 10.0
    webhook_connect_timeout_seconds: float = 5.0
    webhook_max_attempts: int = Field(default=8, ge=1)
    # Retry n waits about base * 2**(n-1) seconds (with jitter), at most the maximum.
    webhook_backoff_base_seconds: float = Field(default=10.0, ge=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, ge=0)
    # Text and HTML bodies in a message.received event are cut to this many bytes each.
    webhook_body_max_bytes: int = Field(default=256 * 1024, ge=0)
    # Receivers should refuse a signature older than this (the replay window).
    webhook_signature_tolerance_seconds: int = 300
    # Messages handed on as one `message.process` task (one transaction for all their
    # steps); deliveries sent by one `webhook.deliver` task.
    processing_batch_size: int = Field(default=500, ge=1, le=5000)
    # Requests in flight at once to one receiver (scheme, host and port) per worker process.
    webhook_concurrency: int = Field(default=8, ge=1, le=100)
    # How often work whose task was lost (Redis flushed, a worker killed) is picked up:
    # messages never processed, deliveries past due.
    processing_sweep_interval_seconds: int = Field(default=300, ge=10)
    # Unset: `cli run` sets it to the address it serves on, for the processes it starts.
    public_base_url: str = DEFAULT_PUBLIC_BASE_URL

    # Metrics: prometheus-client multiprocess files, shared by the API and the workers on
    # one host (a shared volume in compose) so /metrics shows every process's numbers.
    prometheus_multiproc_dir: Path | None = None  # defaults to data_dir / "prometheus"
    # Flower's login (`user:password`), for compose and `make run FLOWER=1`.
    flower_basic_auth: SecretStr | None = None
    # Bound on each /health check and on Celery's inspect broadcasts.
    health_check_timeout_seconds: float = 2.0
    # /health answers from its last result for this long (it needs no token).
    health_cache_seconds: float = Field(default=2.0, ge=0)
    # /metrics: its gauges read from the database and Redis are computed at most once per
    # this many seconds, one computation for all scrapes. With METRICS_TOKEN set it needs
    # `Authorization: Bearer <METRICS_TOKEN>` (or the admin token); without, no token.
    # IMAP host names are a label of mailbeat_push_connections only with
    # METRICS_HOST_LABEL on: an unauthenticated /metrics would show them to anyone.
    metrics_cache_seconds: float = Field(default=5.0, ge=0)
    metrics_token: SecretStr | None = None
    metrics_host_label: bool = False
    celery_inspect_timeout_seconds: float = 1.0

    @field_validator("imap_id")
    @classmethod
    def _imap_id_fits_rfc_2971(cls, value: dict[str, str]) -> dict[str, str]:
        # RFC 2971: at most 30 pairs, a field name of at most 30 octets, a value of at
        # most 1024; printable ASCII keeps the quoting to imapclient.
        if len(value) > 30:
            raise ValueError("IMAP_ID: at most 30 fields")
        for name, text in value.items():
            if not (0 < len(name) <= 30 and len(text) <= 1024):
                raise ValueError("IMAP_ID: field names of 1-30 characters, values of <= 1024")
            if not (name + text).isascii() or not (name + text).isprintable():
                raise ValueError("IMAP_ID: names and values of printable ASCII")
        return value

    @field_validator("connection_limits")
    @classmethod
    def _limits_are_positive(cls, value: dict[str, int]) -> dict[str, int]:
        refused = [host for host, limit in value.items() if limit < 1]
        if refused:
            raise ValueError(f"CONNECTION_LIMITS: each limit must be 1 or more ({refused})")
        return {host.lower().rstrip("."): limit for host, limit in value.items()}

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.environment != "production":
            return self
        missing = [
            name
            for name, value in (
                ("ADMIN_API_TOKEN", self.admin_api_token),
                ("ENCRYPTION_KEY", self.encryption_key),
            )
            if value is None or not value.get_secret_value().strip()
        ]
        if missing:
            raise UnsafeSettingsError(
                f"{', '.join(missing)} must be set when ENVIRONMENT=production ({GENERATE_HINT})"
            )
        assert self.admin_api_token is not None and self.encryption_key is not None
        if len(self.admin_api_token.get_secret_value().strip()) < MIN_ADMIN_TOKEN_LENGTH:
            raise UnsafeSettingsError(
                f"ADMIN_API_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters when "
                "ENVIRONMENT=production (generate one with: python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'; {GENERATE_HINT})"
            )
        try:
            for key in self.fernet_keys():
                Fernet(key)
        except ValueError:
            raise UnsafeSettingsError(
                "ENCRYPTION_KEY must be one or more comma-separated Fernet keys (32 url-safe "
                f"base64-encoded bytes) when ENVIRONMENT=production ({GENERATE_HINT})"
            ) from None
        return self

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def docs_public(self) -> bool:
        return not self.production if self.api_docs_public is None else self.api_docs_public

    @property
    def private_networks_allowed(self) -> bool:
        if self.outbound_allow_private is None:
            return not self.production
        return self.outbound_allow_private

    @property
    def effective_redbeat_redis_url(self) -> str:
        return self.redbeat_redis_url or self.redis_url

    @property
    def effective_prometheus_multiproc_dir(self) -> Path:
        return self.prometheus_multiproc_dir or self.data_dir / "prometheus"

    @property
    def s3_enabled(self) -> bool:
        return bool(self.s3_bucket)

    def fernet_keys(self) -> list[bytes]:
        """The encryption keys, newest first. Development without a key gets one
        generated once and kept under data_dir, so secrets survive a restart."""
        if self.encryption_key is not None and self.encryption_key.get_secret_value().strip():
            raw = self.encryption_key.get_secret_value()
            return [k.strip().encode() for k in raw.split(",") if k.strip()]
        path = self.data_dir / "dev-encryption.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(Fernet.generate_key())
            path.chmod(0o600)
            log.warning("ENCRYPTION_KEY is not set: using a development key kept in %s", path)
        return [path.read_bytes().strip()]

    def admin_token(self) -> str:
        """The API token. Development without one gets a generated token kept under data_dir."""
        if self.admin_api_token is not None and self.admin_api_token.get_secret_value().strip():
            return self.admin_api_token.get_secret_value()
        path = self.data_dir / "dev-admin-token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
            log.warning("ADMIN_API_TOKEN is not set: using a development token kept in %s", path)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    # MAILBEAT_ENV_FILE lets the test suite (and its child processes) ignore a developer's
    # .env in the checkout; everything else reads ./.env.
    return Settings(_env_file=os.environ.get("MAILBEAT_ENV_FILE", ".env"))
