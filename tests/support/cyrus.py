"""A private Cyrus IMAP (Debian 12's 3.6): its own imapd.conf, cyrus.conf, ports, password
database and spool in one directory, run from the packages unpacked by
tests/support/cyrus_install.sh (Debian's cyrus-imapd conflicts with dovecot-imapd).

The interface is the Dovecot fixture's (`MailServer`) where Cyrus allows it; as a
UIDVALIDITY change it removes a folder's index and has `reconstruct` build a new one, and
it kicks a user by the pids in Cyrus's proc directory. Folders are spelled as
Debian's Cyrus has them: `.` separates, and a user's folders live below INBOX
(`INBOX.Archive`); `folder("Archive")` gives a name in the server's spelling. Cyrus
refuses to run as root: as root its processes run as `nobody`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

from imapclient import IMAPClient

from tests.support.mail_server import MailServer
from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group
from tests.support.tls import self_signed_cert

INSTALL_SCRIPT = Path(__file__).with_name("cyrus_install.sh")
CYRUS_DIR = Path("/var/cache/mailbeat/cyrus")
BIN = CYRUS_DIR / "usr/lib/cyrus/bin"
LIBRARIES = CYRUS_DIR / "usr/lib/x86_64-linux-gnu"
SASLPASSWD = "/usr/sbin/saslpasswd2"
ADMIN = "cyrusadmin"
# The special uses (RFC 6154) the Dovecot fixture gives folders of these names; Cyrus
# takes them at CREATE.
SPECIAL_USES = {
    "Drafts": "\\Drafts",
    "Junk": "\\Junk",
    "Trash": "\\Trash",
    "Sent": "\\Sent",
    "Sent Messages": "\\Sent",
}
# A header field's name and colon (RFC 5322 2.2), an mbox "From " line, a continuation.
HEADER_LINE = re.compile(rb"[!-9;-~]+:|From |[ \t]")

# Debian's own choices where they matter to a client (INBOX.Archive, `.`, a deleted
# folder kept aside under DELETED.* as `delete_mode: delayed` does), everything else in
# the fixture's directory. idled tells IDLE sessions of new mail at once (without it
# they look every `imapidlepoll` seconds, 60).
IMAPD_CONF = """\
configdirectory: {root}/conf
proc_path: {root}/proc
mboxname_lockpath: {root}/lock
idlesocket: {root}/conf/socket/idle
lmtpsocket: {root}/conf/socket/lmtp
notifysocket: {root}/conf/socket/notify
sievedir: {root}/sieve
defaultpartition: default
partition-default: {root}/spool
servername: {servername}
cyrus_user: {user}
admins: {admin}
altnamespace: no
unixhierarchysep: no
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {root}/sasldb2
sasl_mech_list: PLAIN LOGIN
tls_server_cert: {root}/cert.pem
tls_server_key: {root}/key.pem
specialusealways: yes
"""

CYRUS_CONF = """\
START {{
  recover cmd="{bin}/ctl_cyrusdb -C {conf} -r"
  idled cmd="{bin}/idled -C {conf}"
}}
SERVICES {{
  imap cmd="{bin}/imapd -C {conf}" listen="127.0.0.1:{imap_port}" prefork=1 maxchild=512
  imaps cmd="{bin}/imapd -s -C {conf}" listen="127.0.0.1:{imaps_port}" prefork=0 maxchild=64
}}
EVENTS {{
  checkpoint cmd="{bin}/ctl_cyrusdb -C {conf} -c" period=30
}}
"""


def ensure_installed() -> None:
    """Unpack Cyrus if it is not there (as root, the way .ci/run does); fail otherwise."""
    if (BIN / "master").exists():
        return
    if os.geteuid() == 0:
        subprocess.run(["bash", str(INSTALL_SCRIPT), str(CYRUS_DIR)], check=True, timeout=600)
        return
    raise RuntimeError(
        f"Cyrus IMAP is not unpacked in {CYRUS_DIR}: run `sudo bash {INSTALL_SCRIPT}`"
    )


class Cyrus(MailServer):
    # Every capability Cyrus offers: CONDSTORE, QRESYNC, OBJECTID, SPECIAL-USE (the
    # Dovecot fixture's `capabilities` names a cut-down set; None is the server's own).
    capabilities: str | None = None

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.root = root
        self.name = name or uuid.uuid4().hex[:8]
        self.servername = f"mailbeat-test-{self.name}"
        self.host = "127.0.0.1"
        self.imap_port = 0
        self.imaps_port = 0
        self.cert_path = root / "cert.pem"
        self.passwords: dict[str, str] = {}
        self._admin_password = uuid.uuid4().hex
        self._process: subprocess.Popen[bytes] | None = None
        user = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.user, self.uid, self.gid = user.pw_name, user.pw_uid, user.pw_gid
        self.config = root / "imapd.conf"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        # imapd binds its own socket for idled beside idled's, in configdirectory/socket.
        for sub in ("conf", "conf/socket", "spool", "proc", "lock", "sieve"):
            (self.root / sub).mkdir(exist_ok=True)
        self_signed_cert(self.root)
        self.imap_port, self.imaps_port = free_port(), free_port()
        self.config.write_text(
            IMAPD_CONF.format(
                root=self.root, servername=self.servername, user=self.user, admin=ADMIN
            )
        )
        (self.root / "cyrus.conf").write_text(
            CYRUS_CONF.format(
                bin=BIN, conf=self.config, imap_port=self.imap_port, imaps_port=self.imaps_port
            )
        )
        self._saslpasswd(ADMIN, self._admin_password)
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, self.uid, self.gid)
        self._process = subprocess.Popen(
            [
                str(BIN / "master"),
                "-D",  # keeps stderr: Cyrus logs only to syslog, which this machine lacks
                "-C",
                str(self.config),
                "-M",
                str(self.root / "cyrus.conf"),
                "-p",
                str(self.root / "master.pid"),
            ],
            env={**os.environ, "LD_LIBRARY_PATH": str(LIBRARIES)},
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "stderr.log", "wb"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
        )
        try:
            wait_for_port(self.imap_port)
            wait_for_port(self.imaps_port)
        except AssertionError as exc:  # wait_for's timeout
            self.stop()
            raise RuntimeError(f"cyrus did not start: {self.log_tail()}") from exc

    def stop(self) -> None:
        if self._process is None:
            return
        stop_group(self._process)
        self._process = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "stderr.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / tool), "-C", str(self.config), *args],
            env={**os.environ, "LD_LIBRARY_PATH": str(LIBRARIES)},
            check=True,
            capture_output=True,
            timeout=60,
        )
        return done.stdout.decode()

    # -- users and mail ----------------------------------------------------------------

    def folder(self, name: str) -> str:
        """A folder as this server spells it: Debian's Cyrus keeps a user's folders
        below INBOX, separated by `.`."""
        return name if name.upper() == "INBOX" else f"INBOX.{name}"

    @staticmethod
    def takes(raw: bytes) -> bool:
        """Whether APPEND takes the message: Cyrus refuses one whose header has a line
        that is no field, such as a body with no empty line before it ("Message contains
        invalid header"), where Dovecot stores anything."""
        head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
        return all(HEADER_LINE.match(line) for line in re.split(rb"\r?\n", head))

    def _saslpasswd(self, username: str, password: str) -> None:
        subprocess.run(
            [
                SASLPASSWD,
                *("-f", str(self.root / "sasldb2"), "-u", self.servername),
                *("-p", "-c", username),  # the password from stdin; created or replaced
            ],
            input=password.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        os.chown(self.root / "sasldb2", self.uid, self.gid)

    def _admin(self) -> IMAPClient:
        client = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=30)
        client.login(ADMIN, self._admin_password)
        return client

    def add_user(self, username: str, password: str = "secret") -> str:
        """Add (or change the password of) a user, with an empty INBOX. Cyrus reads the
        password database at each login: a new password counts at once."""
        known = username in self.passwords
        self._saslpasswd(username, password)
        self.passwords[username] = password
        if not known:
            with self._admin() as admin:
                admin.create_folder(f"user.{username}")
                admin.logout()
        return password

    @staticmethod
    def _create(client: IMAPClient, folder: str) -> None:
        use = SPECIAL_USES.get(folder.removeprefix("INBOX."))
        if use is None:
            client.create_folder(folder)
            return
        # IMAPClient has no CREATE ... (USE ...): the command as RFC 6154 writes it.
        name = client._normalise_folder(folder)
        typ, data = client._imap._simple_command("CREATE", name, f"(USE ({use}))")
        if typ != "OK":
            raise RuntimeError(f"CREATE {folder} (USE ({use})) failed: {data!r}")

    def kick(self, username: str) -> None:
        """Drop the user's connections server-side: each imapd serving one writes
        `<service>\\t<client>\\t<user>\\t<mailbox>` to a file named by its pid."""
        for path in (self.root / "proc").iterdir():
            try:
                fields = path.read_text().split("\t")
            except FileNotFoundError:
                continue  # its process ended meanwhile
            if len(fields) > 2 and fields[2] == username:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(int(path.name), signal.SIGTERM)

    def _mailbox(self, username: str, folder: str) -> str:
        if folder.upper() == "INBOX":
            return f"user.{username}"
        return f"user.{username}.{folder.removeprefix('INBOX.')}"

    def reset_uidvalidity(self, username: str, folder: str = "INBOX") -> None:
        """Make Cyrus renumber a folder, as a restore from its message files does: the
        index is removed and `reconstruct` builds a new one, with a new UIDVALIDITY (the
        UIDs it gives are the files' numbers)."""
        before = self.folder_status(username, folder)[b"UIDVALIDITY"]
        self.kick(username)
        time.sleep(1.1)  # UIDVALIDITY is a timestamp; make sure it differs
        mailbox = self._mailbox(username, folder)
        path = Path(self._run("mbpath", mailbox).strip())
        for name in ("cyrus.index", "cyrus.cache"):
            (path / name).unlink()
        self._run("reconstruct", "-q", mailbox)
        after = self.folder_status(username, folder)[b"UIDVALIDITY"]
        assert after != before, f"reconstruct kept UIDVALIDITY {before}"
