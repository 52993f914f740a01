"""Mail for tests: CPython's email test corpus and generated messages."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "mailbox" / "data"


def corpus() -> list[bytes]:
    """CPython's email test messages, in name order."""
    return [path.read_bytes() for path in sorted(DATA.glob("msg_*.txt"))]


def generated(index: int, *, attachment: bytes | None = None, message_id: bool = True) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Zoë Ünïcode <zoe@example.org>"
    msg["To"] = "Ingest <ingest@example.org>, other@example.org"
    msg["Subject"] = f"Grüße Nr. {index} — 東京"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0100"
    if message_id:
        msg["Message-ID"] = f"<gen-{index}@example.org>"
    msg.set_content(f"Hallo {index}, schöne Grüße.\n")
    msg.add_alternative(f"<p>Hallo {index}</p>", subtype="html")
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="../../etc/Bericht ä.pdf"
        )
    return msg.as_bytes()
