"""Ingestion speed: mailboxes from a local Dovecot into PostgreSQL and local files (a
first sync), beside mbsync (isync) syncing the same mailboxes to local maildirs.

    python -m bench.ingest [--mailboxes 1] [--messages 10000] [--runs 2] [--security ssl|none]
        [--baseline DIR]

`--baseline DIR`: DIR is a checkout of an earlier commit (`git worktree add DIR main`);
each run then also times DIR's mailbeat, in a subprocess with a database of its own
migrated by DIR, between mbsync and this tree's mailbeat: the three take turns under the
same load, on the same Dovecot and mail.

With several mailboxes (`--mailboxes 100 --messages 100`), mbsync syncs them one after
the other in one process (`mbsync -a`) and mailbeat polls them one after the other in
one process (`poll_account` each), so the two compare like for like.

Both clients talk to the same Dovecot over the same transport (implicit TLS by default)
after one warm-up pass, so Dovecot's index and the page cache are equally warm. Each
run starts from an empty database / an empty maildir. Prints messages/s for both.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import text

from tests.support import postgres
from tests.support.dovecot import Dovecot

MBSYNC = shutil.which("mbsync") or "/usr/bin/mbsync"
WORDS = [
    "mail",
    "beat",
    "poll",
    "folder",
    "cursor",
    "batch",
    "message",
    "account",
    "server",
    "schedule",
    "worker",
    "queue",
    "storage",
    "bucket",
    "object",
    "parse",
    "header",
    "body",
    "attachment",
    "invoice",
    "report",
    "meeting",
    "agenda",
]


def message_size(rng: random.Random) -> int:
    """Median about 10 KB; about 1 in 100 between 300 KB and 2 MB."""
    roll = rng.random()
    if roll < 0.01:
        return rng.randint(300_000, 2_000_000)
    if roll < 0.08:
        return rng.randint(30_000, 300_000)
    return int(rng.lognormvariate(9.2, 0.45))  # e^9.2 ~ 9,900 bytes


def build_message(index: int, rng: random.Random) -> bytes:
    size = message_size(rng)
    msg = EmailMessage()
    msg["From"] = f"Sender {index % 97} <sender{index % 97}@example.org>"
    msg["To"] = "Bench <bench@example.org>"
    msg["Subject"] = f"Benchmark message {index}: " + " ".join(rng.choices(WORDS, k=6))
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<bench-{index}@example.org>"
    text_size = min(size, 8_000 + rng.randint(0, 4_000))
    lines = []
    length = 0
    while length < text_size:
        line = " ".join(rng.choices(WORDS, k=12))
        lines.append(line)
        length += len(line) + 1
    msg.set_content("\n".join(lines) + "\n")
    if size > text_size + 1_000:
        # Base64 grows by 4/3; aim the encoded attachment at the rest of the size.
        payload = rng.randbytes((size - text_size) * 3 // 4)
        msg.add_attachment(
            payload, maintype="application", subtype="octet-stream", filename=f"data-{index}.bin"
        )
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def warm_up(dovecot: Dovecot, username: str) -> None:
    """Let Dovecot build its index and the page cache hold the mail, before timing."""
    with dovecot.client(username) as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
        for start in range(0, len(uids), 500):
            client.fetch(uids[start : start + 500], ["BODY.PEEK[]"])
        client.logout()


def set_aside(path: Path) -> Path:
    """Move the last run's files out of the way rather than delete them (they go with
    the work directory at the end): ext4 without a journal (this machine's disk) skips
    each inode freed in the last 60 to 300 seconds when it creates a file, one lookup
    apiece, so a run right after deleting the last run's thousands of files spends
    seconds of system time creating its own. Returns `path`, now free."""
    if path.exists():
        path.rename(path.with_name(f"{path.name}-{time.monotonic_ns()}"))
    return path


def run_mbsync(dovecot: Dovecot, usernames: list[str], security: str, work: Path) -> float:
    target = set_aside(work / "mbsync-maildir")
    target.mkdir(parents=True)
    state = set_aside(work / "mbsync-state")
    state.mkdir()
    port = dovecot.imaps_port if security == "ssl" else dovecot.imap_port
    tls = (
        f"SSLType IMAPS\nCertificateFile {dovecot.cert_path}\n"
        if security == "ssl"
        else "SSLType None\nAuthMechs LOGIN\n"
    )
    config = work / "mbsyncrc"
    sections = []
    for n, username in enumerate(usernames):
        (state / str(n)).mkdir()
        (target / str(n)).mkdir()
        sections.append(
            # The certificate names localhost and 127.0.0.1; mbsync checks DNS names only.
            f"IMAPAccount a{n}\nHost localhost\n"
            f"Port {port}\nUser {username}\n"
            f"Pass {dovecot.passwords[username]}\n{tls}PipelineDepth 50\n\n"
            f"IMAPStore r{n}\nAccount a{n}\n\n"
            f"MaildirStore l{n}\nPath {target}/{n}/\nInbox {target}/{n}/INBOX\n\n"
            f"Channel c{n}\nFar :r{n}:\nNear :l{n}:\nPatterns INBOX\nSync Pull\nCreate Near\n"
            f"SyncState {state}/{n}/\n\n"
        )
    config.write_text("".join(sections))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([MBSYNC, "-q", "-c", str(config), "-a"], check=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    count = sum(
        len(list((target / str(n) / "INBOX" / sub).iterdir()))
        for n in range(len(usernames))
        for sub in ("new", "cur")
    )
    print(
        f"  mbsync: {count} messages in {elapsed:.2f} s "
        f"(CPU user {user:.2f} s, system {system:.2f} s)"
    )
    return elapsed


def run_mailbeat(
    dovecot: Dovecot, usernames: list[str], security: str, storage_dir: Path, *, profile: bool
) -> float:
    from backend import crypto
    from backend.db import get_engine, session_scope
    from backend.mailbox.service import poll_account
    from backend.models import Account, Base

    with get_engine().begin() as conn:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    set_aside(storage_dir)
    with session_scope() as session:
        accounts = [
            Account(
                email=f"{username}@example.org",
                imap_host=dovecot.host,
                imap_port=dovecot.imaps_port if security == "ssl" else dovecot.imap_port,
                imap_security=security,
                username=username,
                auth_method="password",
                credentials_encrypted=crypto.encrypt_json(
                    {"password": dovecot.passwords[username]}
                ),
                folders=["INBOX"],
            )
            for username in usernames
        ]
        session.add_all(accounts)
        session.flush()
        account_ids = [account.id for account in accounts]
    profiler = cProfile.Profile() if profile else None
    others_started = others_cpu(dovecot)
    usage_started = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    results = [poll_account(account_id) for account_id in account_ids]
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    user = usage.ru_utime - usage_started.ru_utime
    system = usage.ru_stime - usage_started.ru_stime
    others = {
        kind: cpu - others_started.get(kind, 0.0) for kind, cpu in others_cpu(dovecot).items()
    }
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    assert all(result.outcome == "success" for result in results), results
    print(
        f"  mailbeat: {sum(r.messages for r in results)} messages, "
        f"{sum(r.bytes for r in results):,} bytes in {elapsed:.2f} s "
        f"(CPU of this process: user {user:.2f} s, system {system:.2f} s)"
    )
    print(
        "  CPU seconds besides: " + ", ".join(f"{kind} {cpu:.2f}" for kind, cpu in others.items())
    )
    return elapsed


def others_cpu(dovecot: Dovecot) -> dict[str, float]:
    """CPU seconds so far of the parsing processes, the Dovecot and PostgreSQL (its
    backends alive now: the run's own connections are pooled, so they stay)."""
    from backend.mailbox import parsing
    from bench.schedule_overload import dovecot_session, postgres_cpu
    from bench.stack import cpu_seconds, session_cpu_seconds

    pool = parsing._pool
    pids = list(pool._processes or {}) if pool is not None else []
    root = getattr(dovecot, "root", None)
    return {
        "parsing": sum(cpu_seconds(pid) for pid in pids),
        "dovecot": session_cpu_seconds(dovecot_session(root)) if root else 0.0,
        "postgresql": postgres_cpu(os.environ["DATABASE_URL"].rsplit("/", 1)[1]),
    }


BASELINE_RUN = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from backend.mailbox import parsing
from bench.ingest import run_mailbeat
args = json.loads(sys.argv[1])
parsing.parse_all([b"Subject: warm\\r\\n\\r\\nup\\r\\n"] * parsing.POOL_MIN_MESSAGES)
elapsed = run_mailbeat(SimpleNamespace(**args["dovecot"]), args["usernames"], args["security"],
                       Path(args["storage"]), profile=False)
print(f"ELAPSED={elapsed}")
"""


def warm_pool() -> None:
    """Start the parsing processes before timing (0.7 s once per process), as a worker
    that has polled before has them (BASELINE_RUN does the same)."""
    from backend.mailbox import parsing

    parsing.parse_all([b"Subject: warm\r\n\r\nup\r\n"] * parsing.POOL_MIN_MESSAGES)


def run_baseline(
    baseline: Path, dovecot: Dovecot, usernames: list[str], security: str, env: dict[str, str]
) -> float:
    """DIR's mailbeat, in its own interpreter (its code, its database)."""
    args = {
        "dovecot": {
            "host": dovecot.host,
            "imap_port": dovecot.imap_port,
            "imaps_port": dovecot.imaps_port,
            "passwords": dovecot.passwords,
        },
        "usernames": usernames,
        "security": security,
        "storage": env["LOCAL_STORAGE_DIR"],
    }
    done = subprocess.run(
        [sys.executable, "-c", BASELINE_RUN, json.dumps(args)],
        cwd=baseline,
        env={**env, "PYTHONPATH": str(baseline)},
        check=True,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.splitlines()
    print("  baseline" + next(line for line in lines if "mailbeat:" in line).strip()[8:])
    return float(next(line for line in lines if line.startswith("ELAPSED="))[8:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mailboxes", type=int, default=1)
    parser.add_argument("--messages", type=int, default=10_000, help="per mailbox")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--security", choices=("ssl", "none"), default="ssl")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the mailbeat runs")
    parser.add_argument("--skip-mbsync", action="store_true")
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mailbeat-bench-"))
    work.chmod(0o755)  # Dovecot's processes must reach the users and homes below it
    dovecot = Dovecot(work / "dovecot")
    database_url = postgres.create_database("mailbeat_bench")
    baseline_url = postgres.create_database("mailbeat_bench") if args.baseline else ""
    try:
        dovecot.start()
        rng = random.Random(42)
        usernames = []
        sizes: list[int] = []
        for n in range(args.mailboxes):
            username = f"bench{n}"
            dovecot.add_user(username, "bench-password")
            raws = [build_message(n * args.messages + i, rng) for i in range(args.messages)]
            sizes += [len(raw) for raw in raws]
            dovecot.write_maildir(username, raws)
            del raws
            warm_up(dovecot, username)
            usernames.append(username)
        sizes.sort()
        print(
            f"{args.mailboxes} mailbox(es) x {args.messages} messages, {sum(sizes):,} bytes, "
            f"median {sizes[len(sizes) // 2]:,} B, largest {sizes[-1]:,} B"
        )

        os.environ.update(
            ENVIRONMENT="test",
            DATABASE_URL=database_url,
            DATA_DIR=str(work / "data"),
            LOCAL_STORAGE_DIR=str(work / "storage"),
            ENCRYPTION_KEY=Fernet.generate_key().decode(),
            S3_BUCKET="",
            IMAP_CA_BUNDLE=str(dovecot.cert_path),
        )
        if args.batch_size:
            os.environ["IMAP_FETCH_BATCH_SIZE"] = str(args.batch_size)
        from alembic import command
        from alembic.config import Config

        command.upgrade(Config(str(Path(__file__).parent.parent / "alembic.ini")), "head")
        baseline_env = {
            **os.environ,
            "DATABASE_URL": baseline_url,
            "LOCAL_STORAGE_DIR": str(work / "storage-baseline"),
        }
        if args.baseline:
            subprocess.run(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=args.baseline,
                env={**baseline_env, "PYTHONPATH": str(args.baseline)},
                check=True,
                capture_output=True,
            )

        warm_pool()
        ours: list[float] = []
        theirs: list[float] = []
        before: list[float] = []
        for run in range(args.runs):
            print(f"run {run + 1}:")
            if not args.skip_mbsync:
                theirs.append(run_mbsync(dovecot, usernames, args.security, work))
            if args.baseline:
                before.append(
                    run_baseline(args.baseline, dovecot, usernames, args.security, baseline_env)
                )
            ours.append(
                run_mailbeat(
                    dovecot, usernames, args.security, work / "storage", profile=args.profile
                )
            )
        total = args.mailboxes * args.messages
        mbsync_rate = total / statistics.median(theirs) if theirs else float("nan")
        ours_rate = total / statistics.median(ours)
        print(
            f"median of {args.runs}: mailbeat {ours_rate:,.0f} messages/s, "
            f"mbsync {mbsync_rate:,.0f} messages/s ({ours_rate / mbsync_rate:.2f}x)"
        )
        if before:
            before_rate = total / statistics.median(before)
            print(
                f"baseline {before_rate:,.0f} messages/s ({before_rate / mbsync_rate:.2f}x "
                f"mbsync); this tree {ours_rate / before_rate:.2f}x the baseline"
            )
        print(f"load: {os.getloadavg()}")
    finally:
        from backend import db

        db.reset_caches()
        dovecot.stop()
        postgres.drop_database(database_url)
        if baseline_url:
            postgres.drop_database(baseline_url)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
