"""Peak memory of a worker process polling: a mailbox of 2 MB messages on a local
Dovecot, and a hostile server announcing a body literal far above the message's stated
size (tests/support/imap_server.py). Each poll runs in a fresh process (as a worker's
pool child); its peak RSS (VmHWM) is compared with the same process's RSS just before
the poll (imports done, connections not yet made).

    python -m bench.poll_memory [--messages 40] [--literal-gb 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

from bench.stack import Stack, load_average
from tests.support.imap_server import FakeImapServer, FakeMessage

ROOT = Path(__file__).resolve().parents[1]
# One poll in a fresh process; prints RSS before and peak after, in MB, and the outcome.
POLL = """
import json, sys
from pathlib import Path
from backend.mailbox.service import poll_account

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0

before = kb("VmRSS:")
result = poll_account(int(sys.argv[1]))
print(json.dumps({"before": before / 1024, "peak": kb("VmHWM:") / 1024,
                  "outcome": str(result.outcome), "messages": result.messages,
                  "error": result.error}))
"""


def two_mb_message(index: int) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = f"big {index}"
    msg["From"] = "bench@example.org"
    msg["To"] = "bench@example.org"
    msg.set_content("A message with a 2 MB attachment.\n")
    msg.add_attachment(os.urandom(1_500_000), maintype="application", subtype="octet-stream")
    return msg.as_bytes()


def poll_in_a_process(account_id: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", POLL, str(account_id)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=900,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def add_account(host: str, port: int, username: str, password: str) -> int:
    from backend import crypto
    from backend.db import session_scope
    from backend.models import Account

    with session_scope() as session:
        account = Account(
            email=f"{username}@example.org",
            imap_host=host,
            imap_port=port,
            imap_security="none",
            username=username,
            credentials_encrypted=crypto.encrypt_json({"password": password}),
            folders=["INBOX"],
        )
        session.add(account)
        session.flush()
        return account.id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--literal-gb", type=float, default=4.0)
    args = parser.parse_args()
    with Stack(dovecot=True) as stack:
        assert stack.dovecot is not None
        print(f"{load_average()}")
        password = stack.dovecot.add_user("big", "pw")
        raws = [two_mb_message(i) for i in range(args.messages)]
        stack.dovecot.write_maildir("big", raws)
        size = sum(len(raw) for raw in raws) / 1e6
        account = add_account(stack.dovecot.host, stack.dovecot.imap_port, "big", password)
        big = poll_in_a_process(account)
        print(f"{args.messages} messages of 2 MB ({size:.0f} MB) from Dovecot: {big}")

        literal = int(args.literal_gb * 1e9)
        messages = [FakeMessage(1, raws[0]), FakeMessage(2, raws[1], literal=literal)]
        with FakeImapServer(messages) as server:
            account = add_account("127.0.0.1", server.port, "hostile", "pw")
            hostile = poll_in_a_process(account)
            print(
                f"literal of {args.literal_gb:g} GB announced for a 2 MB message: {hostile}; "
                f"the server got to send {server.body_bytes_sent / 1e6:.1f} MB"
            )


if __name__ == "__main__":
    main()
