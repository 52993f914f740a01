"""A private Dovecot instance: its own config, ports, users and maildirs in one directory.

Dovecot refuses to run mail processes as uid 0, so as root the maildirs belong to
`nobody`; run as an ordinary user they belong to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from tests.support.mail_server import MailServer
from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group
from tests.support.tls import self_signed_cert

DOVECOT_BIN = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM_BIN = shutil.which("doveadm") or "/usr/bin/doveadm"

CONFIG = """\
protocols = imap
listen = {listen}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
instance_name = mailbeat-test-{name}
default_internal_user = {internal_user}
default_login_user = {login_user}
{internal_group_line}
# Services every imap process talks to (anvil, stats, auth) take this many clients each.
default_client_limit = {client_limit}
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
mail_location = {mail_location}
mail_uid = {mail_uid}
mail_gid = {mail_gid}
first_valid_uid = 1
first_valid_gid = 1
# Big enough for the 10,000-message benchmark mailbox.
imap_max_line_length = 2M
mail_max_userip_connections = 200
# IDLE notices appends by inotify; this is its fallback check, at 1 s rather than 30 s.
mailbox_idle_check_interval = 1 secs
# RFC 6154 special uses on the folders of those names (none is created by itself), as
# Debian's own configuration has them: what LIST tells a client that asks for `\\Sent`.
namespace inbox {{
  inbox = yes
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox "Sent Messages" {{
    special_use = \\Sent
  }}
}}
{capability_line}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users/%u
}}
{oauth2_passdb}userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {listen}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {listen}
    port = {imaps_port}
    ssl = yes
  }}
  process_min_avail = 1
  service_count = 0
}}
# An imap process serves one connection: the limit is the connections the server takes.
service imap {{
  process_limit = {imap_connections}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


# XOAUTH2 / OAUTHBEARER, with tokens checked at an RFC 7662 introspection endpoint.
OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""
OAUTH2_CONFIG = """\
introspection_mode = post
introspection_url = {url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
"""


class Dovecot(MailServer):
    def __init__(
        self,
        root: Path,
        name: str | None = None,
        *,
        oauth2_introspection_url: str | None = None,
        mail_location: str = "maildir:~/Maildir",
        also_listen: str | None = None,
        imap_connections: int = 512,
        capabilities: str | None = None,
    ) -> None:
        """With `oauth2_introspection_url`, users can also log in with XOAUTH2; Dovecot
        posts each token to that URL (`token=...`) and wants {"active": true, "username"}.
        `mail_location="maildir:~/Maildir:LAYOUT=fs"` gives folders a '/' separator (as
        Gmail and Exchange have) instead of Maildir++'s '.'. `also_listen`: one more
        address to listen on besides loopback (the docker bridge's, for containers).
        `imap_connections`: how many logged-in connections the server holds at once (the
        push benchmark's 1,000 IDLE connections are 1,000 imap processes).
        `capabilities`: the capabilities offered after login, in place of Dovecot's (a
        server without CONDSTORE and QRESYNC, say)."""
        self.capabilities = capabilities
        self.root = root
        self.mail_location = mail_location
        self.also_listen = also_listen
        self.imap_connections = imap_connections
        self.oauth2_introspection_url = oauth2_introspection_url
        self.name = name or uuid.uuid4().hex[:8]
        self.host = "127.0.0.1"
        self.imap_port = 0
        self.imaps_port = 0
        self.cert_path = root / "cert.pem"
        self.passwords: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            self.mail_uid, self.mail_gid = 65534, 65534  # nobody
            self._internal = ("dovecot", "dovenull", "")
        else:
            user = pwd.getpwuid(os.geteuid())
            self.mail_uid, self.mail_gid = user.pw_uid, user.pw_gid
            # Unprivileged Dovecot runs every process as the invoking user.
            self._internal = (
                user.pw_name,
                user.pw_name,
                f"default_internal_group = {user.pw_name}",
            )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the mail user must reach its home below it
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chown(self.root / "home", self.mail_uid, self.mail_gid)
        self_signed_cert(self.root)
        (self.root / "users").mkdir(exist_ok=True)
        self.imap_port, self.imaps_port = free_port(), free_port()
        internal, login, group_line = self._internal
        oauth2_passdb = ""
        if self.oauth2_introspection_url:
            (self.root / "dovecot-oauth2.conf.ext").write_text(
                OAUTH2_CONFIG.format(url=self.oauth2_introspection_url)
            )
            oauth2_passdb = OAUTH2_PASSDB.format(root=self.root)
        (self.root / "dovecot.conf").write_text(
            CONFIG.format(
                root=self.root,
                name=self.name,
                listen=", ".join(["127.0.0.1", *filter(None, [self.also_listen])]),
                internal_user=internal,
                login_user=login,
                internal_group_line=group_line,
                mail_uid=self.mail_uid,
                mail_gid=self.mail_gid,
                imap_port=self.imap_port,
                imaps_port=self.imaps_port,
                oauth2_mechanisms=" xoauth2 oauthbearer" if oauth2_passdb else "",
                oauth2_passdb=oauth2_passdb,
                mail_location=self.mail_location,
                imap_connections=self.imap_connections,
                client_limit=max(1000, 2 * self.imap_connections),
                capability_line=(
                    f"imap_capability = {self.capabilities}" if self.capabilities else ""
                ),
            )
        )
        self._process = subprocess.Popen(
            [DOVECOT_BIN, "-F", "-c", str(self.root / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "stderr.log", "wb"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
        )
        try:
            wait_for_port(self.imap_port)
            wait_for_port(self.imaps_port)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {self.log_tail()}") from exc

    def stop(self) -> None:
        if self._process is None:
            return
        stop_group(self._process)
        self._process = None

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("dovecot.log", "stderr.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- users and mail ----------------------------------------------------------------

    def add_user(self, username: str, password: str = "secret") -> str:
        """Add (or change the password of) a user.

        One passwd-file per user: Dovecot stats a known file at most once a second, so a
        new user in a shared file is sometimes not seen yet; a new file always is.
        """
        changed = username in self.passwords
        self.passwords[username] = password
        tmp = self.root / "users" / f".{username}.tmp"
        tmp.write_text(f"{username}:{{PLAIN}}{password}::::::\n")
        tmp.replace(self.root / "users" / username)
        home = self.root / "home" / username
        home.mkdir(exist_ok=True)
        os.chown(home, self.mail_uid, self.mail_gid)
        if changed:
            time.sleep(1.1)  # let Dovecot's once-a-second check see the new password
        return password

    def set_uidvalidity(self, username: str, folder: str, uidvalidity: int) -> None:
        """Force a folder's UIDVALIDITY (two folders can then share one)."""
        subprocess.run(
            [
                DOVEADM_BIN,
                "-c",
                str(self.root / "dovecot.conf"),
                "mailbox",
                "update",
                "-u",
                username,
                "--uid-validity",
                str(uidvalidity),
                folder,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def kick(self, username: str) -> None:
        """Drop the user's connections server-side (as a restart or an admin would)."""
        done = subprocess.run(
            [DOVEADM_BIN, "-c", str(self.root / "dovecot.conf"), "kick", username],
            check=False,
            capture_output=True,
            timeout=30,
        )
        # 68: the user had no connection to drop, which is as good as dropped.
        if done.returncode not in (0, 68):
            done.check_returncode()

    def maildir(self, username: str, folder: str = "INBOX") -> Path:
        base = self.root / "home" / username / "Maildir"
        return base if folder.upper() == "INBOX" else base / f".{folder}"

    def reset_uidvalidity(self, username: str, folder: str = "INBOX") -> None:
        """Make Dovecot renumber a folder: a new UIDVALIDITY and new UIDs for the same mail.

        Removing the uidlist and index files is what a server migration or restore does;
        the sessions open on the old files go with it (a kept one would see broken indexes).
        """
        self.kick(username)
        folder_dir = self.maildir(username, folder)
        for path in folder_dir.iterdir():
            if path.name.startswith("dovecot") and path.is_file():
                path.unlink()
        # Move everything back to new/ so the files are rescanned with fresh UIDs.
        for path in list((folder_dir / "cur").iterdir()):
            path.rename(folder_dir / "new" / path.name.split(":", 1)[0])
        time.sleep(1.1)  # UIDVALIDITY is a timestamp; make sure it differs

    def write_maildir(self, username: str, raws: Iterable[bytes], folder: str = "INBOX") -> int:
        """Drop messages straight into the maildir (fast, for large benchmark mailboxes)."""
        folder_dir = self.maildir(username, folder)
        for sub in ("new", "cur", "tmp"):
            (folder_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in [folder_dir, *folder_dir.parents]:
            if path == self.root / "home":
                break
            os.chown(path, self.mail_uid, self.mail_gid)
        for sub in ("new", "cur", "tmp"):
            os.chown(folder_dir / sub, self.mail_uid, self.mail_gid)
        count = 0
        stamp = int(time.time())
        for raw in raws:
            name = f"{stamp}.M{count}P{os.getpid()}.mailbeat,S={len(raw)}"
            path = folder_dir / "new" / name
            path.write_bytes(raw)
            os.chown(path, self.mail_uid, self.mail_gid)
            count += 1
        return count
