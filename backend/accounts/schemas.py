"""What the accounts API accepts and returns. Secrets are write-only: requests carry them as
SecretStr (never printed), and no response model has a field that could hold one."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    UrlConstraints,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from backend import netpolicy
from backend.config import get_settings
from backend.mailbox import folders, providers
from backend.models.enums import (
    AccountStatus,
    AuthMethod,
    ImapSecurity,
    InitialSync,
    PushStatus,
    SchedulerMode,
)
from backend.paging import NextAfter
from backend.push import service as push

# Explicit characters rather than \s, which means more in Python than in JSON Schema.
# NUL too: PostgreSQL text cannot hold it.
_EMAIL = re.compile(r"^[^@ \t\r\n\x00\ud800-\udfff]+@[^@ \t\r\n\x00\ud800-\udfff]+$")
_HOST = re.compile(r"^[A-Za-z0-9.\-:\[\]_]+$")
# C0 and C1 control characters and DEL. A CR or LF in a value sent to an IMAP server ends
# the command and starts the next one (command injection); PostgreSQL cannot store NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A lone surrogate ("\ud800" in JSON) is a str Python holds but no codec can write: it
# failed in encryption, in the database driver, in an IMAP command, each time as a 500
# or an error naming the character and its position.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# IMAP LOGIN sends only ASCII; other characters are refused here rather than by the
# server (or, before, with the offending character in a 500).
_PRINTABLE_ASCII = re.compile(r"^[ -~]*$")
MAX_URL_LENGTH = 2048  # the webhook_url columns


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("must be an email address like 'name@example.com'")
    return value


def _host(value: str) -> str:
    if not _HOST.match(value):
        raise ValueError(
            "must be a host name or IP address like 'imap.example.com' (no scheme, "
            "no spaces, no port)"
        )
    # DNS names are case-insensitive; one spelling keeps the duplicate check honest.
    value = value.lower()
    if netpolicy.literal_address(value) is None:
        if ":" in value or "[" in value or "]" in value:
            raise ValueError("is neither a host name nor an IP address")
        if any(not 1 <= len(label) <= 63 for label in value.removesuffix(".").split(".")):
            raise ValueError(
                "each dot-separated part of a host name must be 1 to 63 characters long"
            )
    _allowed(netpolicy.address_refusal(value))
    return value


def _allowed(refusal: str | None) -> None:
    if refusal is not None:
        raise ValueError(refusal)


def _url(value: AnyHttpUrl) -> AnyHttpUrl:
    _allowed(netpolicy.url_refusal(str(value)))
    return value


def _token_url(value: AnyHttpUrl) -> AnyHttpUrl:
    _allowed(netpolicy.url_refusal(str(value), https=True))
    return value


def _interval(value: int) -> int:
    settings = get_settings()
    low, high = settings.min_poll_interval_seconds, settings.max_poll_interval_seconds
    if value < low:
        raise ValueError(f"must be at least {low} seconds (MIN_POLL_INTERVAL_SECONDS)")
    if value > high:
        raise ValueError(f"must be at most {high} seconds (MAX_POLL_INTERVAL_SECONDS)")
    return value


def _folders(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("must name at least one folder, e.g. ['INBOX']")
    seen: set[str] = set()
    for folder in value:
        if folder in seen:
            raise ValueError(f"names folder {folder!r} twice")
        refused = folders.invalid_entry(folder)
        if refused is not None:
            raise ValueError(refused)
        seen.add(folder)
    return value


def _secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value().strip(" \t\r\n"):
        raise ValueError("must not be empty")
    # Never the character or its position: the value is a secret.
    _no_control(value.get_secret_value())
    return value


def _password(value: SecretStr) -> SecretStr:
    if not _PRINTABLE_ASCII.match(value.get_secret_value()):
        raise ValueError("must be printable ASCII (IMAP LOGIN cannot send other characters)")
    return value


def _no_control(value: str) -> str:
    """Text that any codec can write and no protocol reads as a command's end. The
    message never names the character or where it is: the value may be a secret."""
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (CR, LF, NUL, tab and the like)")
    return value


def _ascii(value: str) -> str:
    if not _PRINTABLE_ASCII.match(value):
        raise ValueError("must be printable ASCII (IMAP LOGIN cannot send other characters)")
    return value


# The patterns repeat the validators in the schema, so clients (and the fuzzer) know them.
_NO_CONTROL = "^[^\\u0000-\\u001f\\u007f-\\u009f\\ud800-\\udfff]*$"
_ASCII_PATTERN = "^[ -~]*$"
# No control character, and at least one that is not a space.
_NON_BLANK_NO_CONTROL = (
    "^[^\\u0000-\\u001f\\u007f-\\u009f\\ud800-\\udfff]*"
    "[^\\u0000-\\u0020\\u007f-\\u009f\\ud800-\\udfff]"
    "[^\\u0000-\\u001f\\u007f-\\u009f\\ud800-\\udfff]*$"
)
Text = Annotated[
    str,
    StringConstraints(min_length=1, max_length=320),
    AfterValidator(_no_control),
    Field(json_schema_extra={"pattern": _NO_CONTROL}),
]
Username = Annotated[
    str,
    StringConstraints(min_length=1, max_length=320),
    AfterValidator(_no_control),
    AfterValidator(_ascii),
    Field(json_schema_extra={"pattern": _ASCII_PATTERN}),
]
Email = Annotated[
    str,
    StringConstraints(max_length=320),
    AfterValidator(_email),
    Field(json_schema_extra={"pattern": _EMAIL.pattern}),
]
Host = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255),
    AfterValidator(_host),
    Field(json_schema_extra={"pattern": _HOST.pattern}),
]
Port = Annotated[int, Field(ge=1, le=65535, description="1 to 65535; 993 for ssl, 143 else")]
# Bounds come from the settings; the app writes them into the OpenAPI schema (main.py).
Interval = Annotated[int, AfterValidator(_interval)]
Priority = Annotated[
    int,
    Field(
        ge=0,
        le=9,
        description="0 to 9, higher is more urgent: when polls queue up, higher-priority "
        "mailboxes are polled first (default 5)",
    ),
]
# A name without control characters, or a special use in any case (`\\Sent`, `\\sent`).
_FOLDER_PATTERN = "^(?:[^\\\\{c}][^{c}]*|\\\\(?:{uses}))$".format(
    c="\\u0000-\\u001f\\u007f-\\u009f",
    uses="|".join(
        "".join(f"[{letter.upper()}{letter.lower()}]" for letter in use[1:])
        for use in folders.SPECIAL_USES
    ),
)
Folder = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(_no_control),
    Field(
        json_schema_extra={"pattern": _FOLDER_PATTERN},
        description="a folder as the server names it, a special use (\\Inbox, \\Sent, "
        "\\All, \\Archive, \\Drafts, \\Flagged, \\Junk, \\Trash) or * (every folder "
        "but junk and trash)",
    ),
]
Folders = Annotated[
    list[Folder],
    Field(max_length=200, json_schema_extra={"minItems": 1, "uniqueItems": True}),
    AfterValidator(_folders),
]
Secret = Annotated[
    SecretStr,
    Field(min_length=1, max_length=8192, json_schema_extra={"pattern": _NON_BLANK_NO_CONTROL}),
    AfterValidator(_secret),
]
Password = Annotated[
    SecretStr,
    Field(min_length=1, max_length=8192, json_schema_extra={"pattern": "^[ -~]*[!-~][ -~]*$"}),
    AfterValidator(_secret),
    AfterValidator(_password),
]
Url = Annotated[
    AnyHttpUrl,
    UrlConstraints(max_length=MAX_URL_LENGTH),
    AfterValidator(_url),
    Field(description="http(s) URL"),
]
TokenUrl = Annotated[
    AnyHttpUrl,
    UrlConstraints(max_length=MAX_URL_LENGTH),
    AfterValidator(_token_url),
    Field(description="https URL (http only in development and test)"),
]


_OAUTH2_EXAMPLE: JsonDict = {
    "access_token": "ya29.a0...",
    "refresh_token": "1//0g...",
    "expires_at": "2030-01-01T00:00:00Z",
    "client_id": "1234.apps.googleusercontent.com",
    "client_secret": "GOCSPX-...",
    "token_url": "https://oauth2.googleapis.com/token",
}


class OAuth2Credentials(BaseModel):
    """XOAUTH2: an access token, and what is needed to refresh it when it expires."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_OAUTH2_EXAMPLE]})

    access_token: Secret
    refresh_token: Secret | None = None
    expires_at: datetime | None = Field(
        default=None, description="when the access token expires (ISO 8601)"
    )
    client_id: Text | None = None
    client_secret: Secret | None = None
    token_url: TokenUrl | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _date_time_text(cls, value: object) -> object:
        # The schema promises an ISO 8601 string; pydantic alone would take epoch numbers.
        if isinstance(value, int | float):
            raise ValueError("must be an ISO 8601 date-time like '2030-01-01T00:00:00Z'")
        return value

    @model_validator(mode="after")
    def _refreshable(self) -> OAuth2Credentials:
        if self.refresh_token is not None and (self.client_id is None or self.token_url is None):
            raise ValueError(
                "a refresh_token needs client_id and token_url to be usable "
                "(and client_secret when the provider requires one)"
            )
        return self

    def stored(self) -> dict[str, Any]:
        """The credentials as kept (encrypted): plain values, expires_at as epoch seconds."""

        def plain(secret: SecretStr | None) -> str | None:
            return None if secret is None else secret.get_secret_value()

        expires = self.expires_at
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return {
            "access_token": plain(self.access_token),
            "refresh_token": plain(self.refresh_token),
            "expires_at": None if expires is None else int(expires.timestamp()),
            "client_id": self.client_id,
            "client_secret": plain(self.client_secret),
            "token_url": None if self.token_url is None else str(self.token_url),
        }


def check_initial_sync(policy: str, count: int | None, since: date | None) -> None:
    """The initial-sync fields must fit together; raises ValueError saying how."""
    if policy == InitialSync.NEWEST and count is None:
        raise ValueError("initial_sync 'newest' needs initial_sync_count (e.g. 100)")
    if policy == InitialSync.SINCE and since is None:
        raise ValueError("initial_sync 'since' needs initial_sync_since (e.g. '2024-01-01')")
    if count is not None and policy != InitialSync.NEWEST:
        raise ValueError("initial_sync_count goes only with initial_sync 'newest'")
    if since is not None and policy != InitialSync.SINCE:
        raise ValueError("initial_sync_since goes only with initial_sync 'since'")


class _InitialSyncFields(BaseModel):
    initial_sync: InitialSync | None = Field(
        default=None,
        description=(
            "what the first poll of a folder ingests: 'all' (default), 'newest' (the newest "
            "initial_sync_count messages) or 'since' (messages since initial_sync_since)"
        ),
    )
    initial_sync_count: int | None = Field(default=None, ge=1, le=1_000_000)
    initial_sync_since: date | None = None


_CREATE_EXAMPLE: JsonDict = {
    "email": "support@example.com",
    "imap_host": "imap.example.com",
    "imap_port": 993,
    "imap_security": "ssl",
    "username": "support@example.com",
    "password": "app-password",
    "folders": ["INBOX"],
    "poll_interval_seconds": 300,
    "enabled": True,
    "initial_sync": "newest",
    "initial_sync_count": 100,
}


_PROVIDER_DESCRIPTION = (
    "a provider preset ("
    + ", ".join(providers.PROVIDERS)
    + ") fills imap_host, imap_port and imap_security (fields given win) and checks the "
    "login method; GET /accounts/providers lists them with what each needs"
)


def _preset(data: Any) -> Any:
    """The request with its provider's preset filled in under the fields it gave
    (ValueError naming the known providers for an unknown one)."""
    if not isinstance(data, dict) or not isinstance(data.get("provider"), str):
        return data
    preset = providers.named(data["provider"])
    filled = {
        "imap_host": preset.imap_host,
        "imap_port": preset.imap_port,
        "imap_security": preset.imap_security.value,
        **data,
        "provider": preset.name,
    }
    oauth2 = data.get("oauth2")
    if isinstance(oauth2, dict) and preset.token_url and "token_url" not in oauth2:
        filled["oauth2"] = {**oauth2, "token_url": preset.token_url}
    return filled


def _login_allowed(provider: str | None, password: object, oauth2: object) -> None:
    """A preset's provider accepts the login method the request gives."""
    if provider is None or (password is None and oauth2 is None):
        return
    preset = providers.named(provider)
    method = AuthMethod.PASSWORD if password is not None else AuthMethod.OAUTH2
    if method not in preset.auth_methods:
        wanted = " or ".join(m.value for m in preset.auth_methods)
        raise ValueError(
            f"provider {provider!r} accepts only {wanted} logins, not {method.value}: "
            f"{preset.needs}"
        )


class AccountConnection(BaseModel):
    """How to reach and log in to a mailbox: all that POST /accounts/test needs. Give
    exactly one of `password` and `oauth2`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "imap_host": "imap.example.com",
                    "imap_port": 993,
                    "imap_security": "ssl",
                    "username": "support@example.com",
                    "password": "app-password",
                    "folders": ["INBOX"],
                }
            ]
        },
    )

    provider: str | None = Field(default=None, description=_PROVIDER_DESCRIPTION)
    imap_host: Host
    imap_port: Port = 993
    imap_security: ImapSecurity = ImapSecurity.SSL
    username: Username
    password: Password | None = None
    oauth2: OAuth2Credentials | None = None
    folders: Folders = Field(default_factory=lambda: ["INBOX"])

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        return _preset(data)

    @model_validator(mode="after")
    def _one_credential(self) -> AccountConnection:
        if (self.password is None) == (self.oauth2 is None):
            raise ValueError("give exactly one of 'password' and 'oauth2'")
        _login_allowed(self.provider, self.password, self.oauth2)
        return self


class AccountCreate(_InitialSyncFields, AccountConnection):
    """A mailbox to poll. Give exactly one of `password` and `oauth2`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                _CREATE_EXAMPLE,
                {
                    "email": "ops@example.org",
                    "imap_host": "imap.gmail.com",
                    "imap_port": 993,
                    "username": "ops@example.org",
                    "oauth2": _OAUTH2_EXAMPLE,
                    "folders": ["INBOX", "Support"],
                    "initial_sync": "since",
                    "initial_sync_since": "2024-01-01",
                },
            ]
        },
    )

    email: Email
    poll_interval_seconds: Interval | None = Field(
        default=None, description="seconds between polls (default DEFAULT_POLL_INTERVAL_SECONDS)"
    )
    priority: Priority = 5
    enabled: bool = True
    push: bool = Field(
        default=False,
        description="hold an IMAP IDLE connection (a watcher process) and poll at once when "
        "mail arrives; the interval's polls go on as the safety net",
    )
    track_changes: bool = Field(
        default=True,
        description="follow flags, deletions and moves on the server (message.updated, "
        "message.deleted, message.moved events)",
    )
    webhook_url: Url | None = Field(default=None, description="this mailbox's own webhook")
    webhook_secret: Secret | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AccountCreate:
        check_initial_sync(
            self.initial_sync or InitialSync.ALL, self.initial_sync_count, self.initial_sync_since
        )
        return self


# Null clears these; any other field sent as null is a mistake.
NULLABLE_ON_UPDATE = {
    "initial_sync_count",
    "initial_sync_since",
    "webhook_url",
    "webhook_secret",
    "provider",
}


class AccountUpdate(_InitialSyncFields):
    """Only the fields given change. A new `password` or `oauth2` replaces the credentials
    (and switches the method); credentials or server changes clear the failure backoff."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"poll_interval_seconds": 60},
                {"password": "new-app-password"},
                {"enabled": True},
                {"folders": ["INBOX", "Archive"]},
            ]
        },
    )

    provider: str | None = Field(default=None, description=_PROVIDER_DESCRIPTION)
    email: Email | None = None
    imap_host: Host | None = None
    imap_port: Port | None = None
    imap_security: ImapSecurity | None = None
    username: Username | None = None
    password: Password | None = None
    oauth2: OAuth2Credentials | None = None
    folders: Folders | None = None
    poll_interval_seconds: Interval | None = None
    priority: Priority | None = None
    enabled: bool | None = None
    push: bool | None = None
    track_changes: bool | None = None
    webhook_url: Url | None = None
    webhook_secret: Secret | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        return _preset(data)

    @model_validator(mode="after")
    def _consistent(self) -> AccountUpdate:
        if self.password is not None and self.oauth2 is not None:
            raise ValueError("give at most one of 'password' and 'oauth2'")
        _login_allowed(self.provider, self.password, self.oauth2)
        for name in self.model_fields_set - NULLABLE_ON_UPDATE:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


# Userinfo in a webhook URL (basic auth for the receiver) is a secret: never returned.
RedactedUrl = Annotated[str, AfterValidator(netpolicy.redact_userinfo)]


class SyncProgress(BaseModel):
    """Messages of a folder's latest sync stored so far, of those it set out to fetch. A
    sync that stopped half-way (a time limit, a lost connection) goes on from `done`."""

    done: int
    total: int


class AccountRead(BaseModel):
    """A mailbox and its polling state. Credentials never appear here."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    imap_host: str
    imap_port: int
    imap_security: str
    username: str
    provider: str | None = Field(
        default=None, description="the provider preset it was made from (null: none)"
    )
    auth_method: AuthMethod
    folders: list[str]
    poll_interval_seconds: int
    priority: int
    enabled: bool
    push: bool
    push_status: PushStatus | None = Field(
        description="with push on, what the watcher found: 'watching' (IDLE held, "
        "confirmed by a live watcher within two WATCHER_LEASE_SECONDS), 'stale' (was "
        "watching, but no live watcher has confirmed it since: none runs, or it died) or "
        "'unsupported' (the server has no IDLE: polled on the interval only), 'failing' "
        "(a watcher cannot connect or select a folder and keeps trying; push_confirmed_at "
        "says when it last watched); null before a watcher has tried, and after a change "
        "of login until the watcher has connected with it (seconds)"
    )
    push_confirmed_at: datetime | None = Field(
        description="when a live watcher last confirmed push_status 'watching'"
    )
    track_changes: bool
    initial_sync: str
    initial_sync_count: int | None
    initial_sync_since: date | None
    webhook_url: RedactedUrl | None
    status: AccountStatus
    last_polled_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    last_error_kind: str | None
    consecutive_failures: int
    backoff_until: datetime | None
    disabled_reason: str | None
    message_count: int
    sync_progress: dict[str, SyncProgress] | None = Field(
        description="per folder, how far its latest sync has come (null before the first)"
    )
    stale_since: datetime | None = Field(
        default=None,
        description="stale: since when it has had no complete poll within its freshness "
        "limit (null: fresh); set by the freshness check, every minute",
    )
    audited_at: datetime | None = Field(
        default=None, description="when its last audit was sent (GET /accounts/{id}/audit)"
    )
    created_at: datetime
    updated_at: datetime

    @model_validator(mode="after")
    def _stale_push(self) -> AccountRead:
        self.push_status = push.shown_status(self.push_status, self.push_confirmed_at)
        return self


class AccountList(BaseModel):
    items: list[AccountRead]
    total: int
    next_after: NextAfter = None


class PollQueued(BaseModel):
    account_id: int
    task_id: str
    mode: SchedulerMode


class FolderCheckRead(BaseModel):
    name: str
    ok: bool
    detail: str
    messages: int | None = None


class AccountCheckRead(BaseModel):
    """The outcome of trying the account now. `stage` names the step that failed:
    dns, connect, tls, auth or folder, or budget: the host's connection budget was full, so
    nothing was tried (None when everything worked)."""

    ok: bool
    stage: str | None
    detail: str
    folders: list[FolderCheckRead]


class FolderRead(BaseModel):
    """A configured folder and how far it is ingested. The cursor fields are null until
    its first poll."""

    name: str
    uidvalidity: int | None
    last_uid: int | None
    updated_at: datetime | None
    sync_done: int | None = Field(description="messages of the latest sync stored so far")
    sync_total: int | None = Field(description="messages the latest sync set out to fetch")
    error: str | None = Field(
        default=None,
        description="why the folder's last try failed while the mailbox's other folders "
        "were polled (gone, refused); null when it did not",
    )
    failures: int = Field(default=0, description="its failed tries in a row")
    retry_at: datetime | None = Field(default=None, description="when it is tried again")


class FolderList(BaseModel):
    items: list[FolderRead]


class ProviderRead(BaseModel):
    """A provider preset: what `provider` fills in on an account, what the provider
    needs of the user, and the connections mailbeat allows itself there."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    label: str
    imap_host: str
    imap_port: int
    imap_security: ImapSecurity
    auth_methods: list[AuthMethod]
    needs: str
    host_limit: int | None = Field(description="connections to the host in all (null: none)")
    account_limit: int | None = Field(description="connections per login (null: none)")


class ProviderList(BaseModel):
    items: list[ProviderRead]
