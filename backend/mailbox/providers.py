"""Mail providers as data: how to reach each one (the account presets) and how many
connections it accepts (the connection budget, backend/mailbox/budget.py).

One table, documented in docs/providers.md. `hosts` are the IMAP host names whose limits
a provider sets: a mailbox is matched by its `imap_host`, whether or not it was created
from a preset. `host_limit` caps mailbeat's connections to the host as a
whole (all its mailboxes, every process); `account_limit` caps one login's. None: no cap
of that kind. CONNECTION_LIMITS (settings) overrides the host cap per
host.

The figures are the providers' documented or observed per-user limits, with room left
for the user's own mail clients (a phone, a desktop): Gmail allows 15 simultaneous IMAP
connections per account, Microsoft 365 about 16, Yahoo and iCloud fewer; QQ, NetEase and
the Chinese business services answer `too many connections` or `Unsafe Login` well
before that. Host caps exist where a provider limits by client address (NetEase, QQ).
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.models.enums import AuthMethod, ImapSecurity


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    imap_host: str
    imap_port: int
    imap_security: ImapSecurity
    # What a login may use, the first the preferred one.
    auth_methods: tuple[AuthMethod, ...]
    # What the user must prepare: shown by the console, written in docs/providers.md.
    needs: str
    hosts: tuple[str, ...] = ()
    host_limit: int | None = None
    account_limit: int | None = None
    # Filled into `oauth2.token_url` when the account gives OAuth2 credentials without one.
    token_url: str | None = None


PASSWORD_ONLY = (AuthMethod.PASSWORD,)
EITHER = (AuthMethod.OAUTH2, AuthMethod.PASSWORD)
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/common/oauth2/v2.0/token"  # noqa: S105

# Any server no row names (a company's Dovecot or Exchange): Dovecot's default
# mail_max_userip_connections is 10 per user and address.
DEFAULT = Provider(
    name="default",
    label="Other IMAP server",
    imap_host="",
    imap_port=993,
    imap_security=ImapSecurity.SSL,
    auth_methods=EITHER,
    needs="the server's host, port and security from its administrator",
    host_limit=100,
    account_limit=8,
)

PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider(
            name="gmail",
            label="Gmail / Google Workspace",
            imap_host="imap.gmail.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=EITHER,
            needs="OAuth2 (a Google Cloud client with the https://mail.google.com/ scope), "
            "or an app password with 2-Step Verification on; IMAP enabled in Gmail's settings",
            hosts=("imap.gmail.com", "imap.googlemail.com"),
            account_limit=12,
            token_url=GOOGLE_TOKEN_URL,
        ),
        Provider(
            name="outlook",
            label="Outlook.com / Microsoft 365",
            imap_host="outlook.office365.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=(AuthMethod.OAUTH2,),
            needs="OAuth2 only (Microsoft turned basic authentication off): an Entra app "
            "with IMAP.AccessAsUser.All, and IMAP enabled for the mailbox",
            hosts=("outlook.office365.com", "imap-mail.outlook.com", "outlook.live.com"),
            account_limit=12,
            token_url=MICROSOFT_TOKEN_URL,
        ),
        Provider(
            name="qq",
            label="QQ Mail",
            imap_host="imap.qq.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=PASSWORD_ONLY,
            needs="the authorization code (授权码) from QQ Mail's settings as the password, "
            "with IMAP/SMTP turned on there; the QQ password itself is refused",
            hosts=("imap.qq.com", "imap.foxmail.com"),
            host_limit=20,
            account_limit=4,
        ),
        Provider(
            name="netease",
            label="NetEase (163, 126, yeah.net)",
            imap_host="imap.163.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=PASSWORD_ONLY,
            needs="the client authorization password from the mailbox's settings, with "
            "IMAP turned on; mailbeat identifies itself (IMAP_ID), which NetEase requires "
            "before any folder. For 126 or yeah.net give imap_host imap.126.com or "
            "imap.yeah.net",
            hosts=("imap.163.com", "imap.126.com", "imap.yeah.net", "imap.188.com"),
            host_limit=20,
            account_limit=4,
        ),
        Provider(
            name="exmail",
            label="Tencent Exmail (企业邮箱)",
            imap_host="imap.exmail.qq.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=PASSWORD_ONLY,
            needs="the client-specific password when secure login is on, and IMAP allowed "
            "by the domain's administrator",
            hosts=("imap.exmail.qq.com",),
            host_limit=40,
            account_limit=4,
        ),
        Provider(
            name="aliyun",
            label="Aliyun Mail (阿里邮箱)",
            imap_host="imap.qiye.aliyun.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=PASSWORD_ONLY,
            needs="the mailbox password (or a third-party client password when required), "
            "IMAP allowed by the administrator; personal mailboxes use imap.aliyun.com",
            hosts=("imap.qiye.aliyun.com", "imap.aliyun.com", "imap.mxhichina.com"),
            host_limit=40,
            account_limit=4,
        ),
        Provider(
            name="yahoo",
            label="Yahoo Mail",
            imap_host="imap.mail.yahoo.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=EITHER,
            needs="an app password (Account security, Generate app password)",
            hosts=("imap.mail.yahoo.com",),
            account_limit=4,
        ),
        Provider(
            name="icloud",
            label="iCloud Mail",
            imap_host="imap.mail.me.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=PASSWORD_ONLY,
            needs="an app-specific password from appleid.apple.com (two-factor on); the "
            "username is the iCloud address",
            hosts=("imap.mail.me.com",),
            account_limit=4,
        ),
        Provider(
            name="zoho",
            label="Zoho Mail",
            imap_host="imap.zoho.com",
            imap_port=993,
            imap_security=ImapSecurity.SSL,
            auth_methods=EITHER,
            needs="IMAP access turned on in Zoho Mail's settings, and an application-"
            "specific password with two-factor on; EU accounts use imap.zoho.eu",
            hosts=("imap.zoho.com", "imap.zoho.eu", "imappro.zoho.com", "imap.zoho.in"),
            account_limit=4,
        ),
    )
}


def named(name: str) -> Provider:
    """The preset of this name; ValueError naming the known ones."""
    found = PROVIDERS.get(name.strip().lower())
    if found is None:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    return found


def for_host(host: str) -> Provider:
    """The provider whose limits apply to an IMAP host (DEFAULT for any other)."""
    host = host.lower().rstrip(".")
    for provider in PROVIDERS.values():
        if host in provider.hosts:
            return provider
    return DEFAULT
