"""The operator's commands of `python -m backend.cli`: accounts, status, schedules, dead
letters, backfill, re-parsing, quarantined messages and audit. They call the same services
as the API, in this process, and each command is its own boundary: it commits, then brings
the schedule along.

Every command prints a readable table, or with `--json` the API's own shapes. Work that
takes a while (a poll, a backfill, a re-parse, an audit) draws a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, TextIO

import pydantic
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.accounts import service as accounts
from backend.accounts.schemas import AccountCreate, AccountRead, AccountUpdate
from backend.admin import service as admin
from backend.admin.schemas import PollRunRead
from backend.audit import service as audits
from backend.config import get_settings
from backend.db import session_scope
from backend.errors import MailbeatError
from backend.mailbox.check import check_account
from backend.messages.schemas import MessageSummary
from backend.models import (
    Account,
    AccountStatus,
    AuditOutcome,
    PollOutcome,
    SchedulerMode,
    utcnow,
)
from backend.processing import backfill as backfills
from backend.processing import quarantine
from backend.processing import reparse as reparsing
from backend.processing.service import hand_on
from backend.schedules import service as schedules
from backend.webhooks import service as webhooks
from backend.webhooks.schemas import DeadLetter

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """Shown to the operator as it is, with exit status 1."""


# -- output ---------------------------------------------------------------------------------


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Plain columns, as wide as their widest cell."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(header)]
    for row in [list(header), *cells]:
        print(
            "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return f"{human_seconds((utcnow() - moment).total_seconds())} ago"


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


class ProgressBar:
    """`label [#####.....] done/total` on stderr: redrawn in place on a terminal, a line
    per change otherwise (logs, pipes)."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        if (done, total) == self.last:
            return
        self.last = (done, total)
        filled = self.WIDTH if total <= 0 else min(self.WIDTH, self.WIDTH * done // total)
        percent = 100 if total <= 0 else min(100, 100 * done // total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} {percent}%"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream.isatty() and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


# -- accounts -------------------------------------------------------------------------------


def _account_json(account: Account) -> dict[str, Any]:
    return AccountRead.model_validate(account).model_dump(mode="json")


def accounts_list(args: argparse.Namespace) -> int:
    with session_scope() as session:
        items = accounts.list_accounts(session, status=args.status, limit=10_000_000).items
        if args.json:
            emit_json([_account_json(account) for account in items])
            return 0
        table(
            [
                (
                    a.id,
                    a.email,
                    a.status,
                    a.priority,
                    ago(a.last_polled_at),
                    ago(a.last_success_at),
                    a.message_count,
                    a.last_error,
                )
                for a in items
            ],
            (
                "ID",
                "MAILBOX",
                "STATUS",
                "PRIO",
                "LAST POLL",
                "LAST SUCCESS",
                "MESSAGES",
                "LAST ERROR",
            ),
        )
    return 0


def accounts_show(args: argparse.Namespace) -> int:
    with session_scope() as session:
        account = accounts.get_account(session, args.id)
        folders = accounts.folder_cursors(session, account)
        runs = accounts.list_poll_runs(session, account.id, limit=5).items
        data = _account_json(account)
        data["folders_state"] = [
            {
                "name": name,
                "uidvalidity": cursor.uidvalidity if cursor else None,
                "last_uid": cursor.last_uid if cursor else None,
            }
            for name, cursor in folders
        ]
        data["poll_runs"] = [
            PollRunRead.model_validate(run).model_dump(mode="json") for run in runs
        ]
    if args.json:
        emit_json(data)
        return 0
    width = max(len(key) for key in data)
    for key, value in data.items():
        if key in ("folders_state", "poll_runs"):
            continue
        print(f"{key.ljust(width)}  {_cell(value)}")
    print("\nfolders:")
    table(
        [(f["name"], f["uidvalidity"], f["last_uid"]) for f in data["folders_state"]],
        ("FOLDER", "UIDVALIDITY", "LAST UID"),
    )
    print("\nrecent polls:")
    table(
        [
            (r["started_at"], r["outcome"], r["messages_count"], r["duration_seconds"], r["error"])
            for r in data["poll_runs"]
        ],
        ("STARTED", "OUTCOME", "MESSAGES", "SECONDS", "ERROR"),
    )
    return 0


def _password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if args.password is not None:
        return str(args.password)
    if sys.stdin.isatty():
        return getpass.getpass(f"password for {args.username}: ")
    raise CommandError("give the password: --password-stdin (or --password, seen by `ps`)")


def accounts_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "email": args.email,
        "imap_host": args.host,
        "imap_security": args.security,
        "username": args.username or args.email,
        "password": None,
        "folders": args.folders.split(","),
        "enabled": not args.disabled,
        "priority": args.priority,
    }
    args.username = body["username"]
    body["password"] = _password(args)
    if args.port is not None:
        body["imap_port"] = args.port
    if args.interval is not None:
        body["poll_interval_seconds"] = args.interval
    data = _validated(AccountCreate, body)
    with session_scope() as session:
        account = accounts.create_account(session, data)
        session.commit()
        schedules.sync_account(account)
        result = _account_json(account)
    if args.json:
        emit_json(result)
    else:
        print(f"added account {result['id']}: {result['email']} ({result['status']})")
    return 0


def _validated(model: type[pydantic.BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except pydantic.ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'input'}: {error['msg']}"
            for error in exc.errors()
        ]
        raise CommandError("invalid account:\n  " + "\n  ".join(problems)) from None


def accounts_test(args: argparse.Namespace) -> int:
    with session_scope() as session:
        account = accounts.get_account(session, args.id)
        result = check_account(account, timeout=get_settings().imap_connect_timeout)
    data = {
        "ok": result.ok,
        "stage": None if result.ok else result.stage,
        "detail": result.detail,
        "folders": [
            {"name": f.name, "ok": f.ok, "detail": f.detail, "messages": f.messages}
            for f in result.folders
        ],
    }
    if args.json:
        emit_json(data)
    else:
        print(
            "ok: login and folders work"
            if result.ok
            else f"failed at {result.stage}: {result.detail}"
        )
        for folder in result.folders:
            print(f"  {folder.name}: {folder.detail}")
    return 0 if result.ok else 1


def accounts_set_enabled(enabled: bool) -> Handler:
    def run(args: argparse.Namespace) -> int:
        with session_scope() as session:
            account = accounts.update_account(
                session, accounts.get_account(session, args.id), AccountUpdate(enabled=enabled)
            )
            session.commit()
            schedules.sync_account(account)
            result = _account_json(account)
        if args.json:
            emit_json(result)
        else:
            print(f"account {result['id']} ({result['email']}): {result['status']}")
        return 0

    return run


def accounts_delete(args: argparse.Namespace) -> int:
    with session_scope() as session:
        account = accounts.get_account(session, args.id)
        email = account.email
        if not args.yes:
            if not sys.stdin.isatty():
                raise CommandError(f"deleting {email} removes all its messages: add --yes")
            if input(f"delete {email} and all its stored messages? [y/N] ").lower() != "y":
                print("not deleted")
                return 1
        accounts.delete_account(session, account)
        session.commit()
    schedules.remove_account(args.id)
    if args.json:
        emit_json({"deleted": args.id})
    else:
        print(f"deleted account {args.id} ({email})")
    return 0


def accounts_poll(args: argparse.Namespace) -> int:
    """Poll in this process (no worker needed), with the progress the poll reports."""
    return poll(args.id)


def poll(account_id: int) -> int:
    """Poll one account now, in this process, and hand its new messages on in-process
    (no Celery worker needed). Prints the result; the exit status is 0 only on success."""
    # Only `poll` needs the ingestion code: 133 more modules, 0.36 s on every other command
    # (python -X importtime on a loaded 2-core machine).
    from backend.mailbox.polling import run_poll  # noqa: PLC0415 - start-up cost, above

    dispatch.run_in_process()
    bar = ProgressBar(f"poll {account_id}")

    def progress(folders: dict[str, dict[str, int]]) -> None:
        bar.update(
            sum(f["done"] for f in folders.values()), sum(f["total"] for f in folders.values())
        )

    done = run_poll(account_id, None, on_progress=progress)
    bar.finish()
    if isinstance(done, str):  # stale or locked: did not run
        print(json.dumps({"account_id": account_id, "outcome": done}))
        return 1
    summary = {
        "account_id": account_id,
        "outcome": done.outcome,
        "messages": done.messages,
        "bytes": done.bytes,
        "duration_seconds": round(done.duration_seconds, 3),
        "error": done.error,
        "account_event": done.account_event,
    }
    print(json.dumps(summary))
    ok = done.outcome in (PollOutcome.SUCCESS, PollOutcome.SKIPPED) and done.error is None
    return 0 if ok else 1


# -- status ----------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    with session_scope() as session:
        data = _status(session)
    if args.json:
        emit_json(data)
        return 0
    counts = data["mailboxes"]
    print(f"mode:       {data['mode']}")
    print(
        "mailboxes:  "
        + ", ".join(f"{counts[name]} {name}" for name in ("active", "error", "disabled"))
        + f" ({sum(counts.values())} in all)"
    )
    lag = data["lag_seconds"]
    print(f"lag:        {'-' if lag is None else human_seconds(lag)} (oldest last success)")
    print(f"queue:      {'-' if data['queue_length'] is None else data['queue_length']} waiting")
    print(
        f"polls/s:    {data['completed_polls_per_second']:.2f} done (last minute), "
        f"{data['completed_checks_per_second']:.2f} held checks, "
        f"{data['demanded_polls_per_second']:.2f} asked"
        + (" - falling behind: add workers or lengthen intervals" if data["behind"] else "")
    )
    workers = data["workers"]
    if isinstance(workers, str):
        print(f"workers:    {workers}")
    else:
        print(f"workers:    {len(workers)}")
        for worker in workers:
            print(
                f"  {worker['name']}: {worker['active']} running, "
                f"{worker['concurrency']} processes, queues {', '.join(worker['queues'])}"
            )
    if data["failing"]:
        print("\nfailing mailboxes:")
        table(
            [(f["id"], f["email"], f["status"], f["last_error"]) for f in data["failing"]],
            ("ID", "MAILBOX", "STATUS", "LAST ERROR"),
        )
    return 0


def _status(session: Session) -> dict[str, Any]:
    counts = {str(status): 0 for status in AccountStatus}
    for name, count in session.execute(
        select(Account.status, func.count()).group_by(Account.status)
    ):
        counts[str(name)] = int(count)
    oldest = session.scalar(
        select(func.min(func.coalesce(Account.last_success_at, Account.created_at))).where(
            Account.enabled.is_(True)
        )
    )
    failing = session.scalars(
        select(Account).where(Account.status != AccountStatus.ACTIVE).order_by(Account.id).limit(20)
    ).all()
    capacity = admin.capacity(session)
    mode = dispatch.mode()
    workers: list[dict[str, Any]] | str
    if mode == SchedulerMode.LOCAL:
        workers = "none (local mode: polls run in the API process)"
    else:
        try:
            workers = [w.model_dump() for w in admin.list_workers().workers]
        except MailbeatError as exc:
            workers = f"unknown: {exc.message}"
    return {
        "mode": str(mode),
        "mailboxes": counts,
        "lag_seconds": None if oldest is None else round((utcnow() - oldest).total_seconds()),
        "queue_length": capacity.queue_length,
        "oldest_pending_seconds": capacity.oldest_pending_seconds,
        "demanded_polls_per_second": capacity.demanded_polls_per_second,
        "completed_polls_per_second": capacity.completed_polls_per_second,
        "completed_checks_per_second": capacity.completed_checks_per_second,
        "behind": capacity.behind,
        "workers": workers,
        "failing": [
            {"id": a.id, "email": a.email, "status": str(a.status), "last_error": a.last_error}
            for a in failing
        ],
    }


# -- schedules ------------------------------------------------------------------------------


def schedules_sync(args: argparse.Namespace) -> int:
    with session_scope() as session:
        result = admin.sync_schedule(session)
    if args.json:
        emit_json(result.model_dump())
    else:
        print(", ".join(f"{value} {name}" for name, value in result.model_dump().items()))
    return 0


def schedules_list(args: argparse.Namespace) -> int:
    with session_scope() as session:
        schedule = admin.list_schedule(session, limit=10_000_000)
    if args.json:
        emit_json(schedule.model_dump(mode="json"))
        return 0
    print(f"mode: {schedule.mode}, {schedule.total} entries")
    table(
        [(e.account_id, e.interval, e.last_run_at, e.next_run_at) for e in schedule.items],
        ("ACCOUNT", "EVERY (S)", "LAST RUN", "NEXT RUN"),
    )
    return 0


# -- dead letters ---------------------------------------------------------------------------


def dead_letters_list(args: argparse.Namespace) -> int:
    with session_scope() as session:
        page = webhooks.list_dead_letters(session, limit=args.limit, account_id=args.account)
        total = page.total
        letters = [DeadLetter.model_validate(item).model_dump(mode="json") for item in page.items]
    if args.json:
        emit_json({"items": letters, "total": total})
        return 0
    print(f"{total} dead letters")
    table(
        [
            (
                d["id"],
                d["event_type"],
                d["account_id"],
                d["attempts"],
                d["last_status_code"],
                d["last_error"],
            )
            for d in letters
        ],
        ("ID", "EVENT", "ACCOUNT", "ATTEMPTS", "STATUS", "LAST ERROR"),
    )
    return 0


def dead_letters_replay(args: argparse.Namespace) -> int:
    if sum((bool(args.ids), args.account is not None, args.all)) != 1:
        raise CommandError(
            "name dead letter ids, or --account ID for all of one account's, or --all"
        )
    with session_scope() as session:
        ids: list[int] = []
        for delivery_id in args.ids:
            ids += webhooks.replay_dead_letters(session, delivery_id=delivery_id)
        if args.account is not None or args.all:
            ids += webhooks.replay_dead_letters(session, account_id=args.account)
        session.commit()
    # Sent after the commit, or a fast worker would find them still dead.
    webhooks.dispatch(ids)
    if args.json:
        emit_json({"replayed": len(ids), "delivery_ids": ids})
    else:
        print(f"replayed {len(ids)}: {', '.join(map(str, ids)) or '-'}")
    return 0


# -- backfill -------------------------------------------------------------------------------


def backfill(args: argparse.Namespace) -> int:
    with session_scope() as session:
        account = accounts.get_account(session, args.id)
        folders = list(args.folder or account.folders or ["INBOX"])
    window = backfills.Range(
        uid_from=args.uid_from, uid_to=args.uid_to, since=args.since, before=args.before
    )
    progress = ProgressBar(f"backfill {args.id}")
    progress.update(0, len(folders))
    results = []
    for done, folder in enumerate(folders, start=1):
        # One folder at a time, so the bar moves as the work does.
        results.append(
            backfills.backfill(
                args.id,
                window=window,
                folders=[folder],
                dry_run=args.dry_run,
                redeliver=args.redeliver,
            )
        )
        progress.update(done, len(folders))
    progress.finish()
    rows = [entry for result in results for entry in result.folders]
    if args.json:
        emit_json(
            {
                "dry_run": args.dry_run,
                "folders": [vars(entry) for entry in rows],
                "stored_message_ids": [i for r in results for i in r.stored_message_ids],
                "redelivered_message_ids": [i for r in results for i in r.redelivered_message_ids],
            }
        )
        return 0
    table(
        [
            (e.folder, e.on_server, e.held, e.missing, e.stored, e.handed_on, e.redelivered)
            for e in rows
        ],
        ("FOLDER", "ON SERVER", "HELD", "MISSING", "STORED", "HANDED ON", "REDELIVERED"),
    )
    if args.dry_run:
        print("dry run: nothing fetched or sent")
    return 0


# -- audit ----------------------------------------------------------------------------------


def accounts_audit(args: argparse.Namespace) -> int:
    """Audit one mailbox now, in this process: a bar over its folders."""
    with session_scope() as session:
        folders = list(accounts.get_account(session, args.id).folders or ["INBOX"])
    dispatch.run_in_process()  # what is stored again is handed on here, as `poll` does
    bar = ProgressBar(f"audit {args.id}")
    bar.update(0, len(folders))
    done: list[audits.FolderResult] = []

    def progress(entry: audits.FolderResult) -> None:
        done.append(entry)
        bar.update(len(done), len(folders))

    result = audits.audit_account(args.id, deep=args.deep, on_folder=progress)
    bar.finish()
    return _audit_report([result], as_json=args.json)


def audit_many(args: argparse.Namespace) -> int:
    """Audit every scheduled mailbox (`--all`) or the ones named, one after another: a
    bar over the mailboxes. One that fails does not stop the others."""
    if bool(args.all) == bool(args.ids):
        raise CommandError("name account ids, or --all (not both)")
    with session_scope() as session:
        query = select(Account.id).order_by(Account.id)
        if args.all:
            query = query.where(schedules.wanted_clause())
        else:
            query = query.where(Account.id.in_(args.ids))
        ids = list(session.scalars(query))
    unknown = sorted(set(args.ids or ()) - set(ids))
    if unknown:
        raise CommandError(f"no such account: {', '.join(map(str, unknown))}")
    dispatch.run_in_process()
    bar = ProgressBar("audit")
    bar.update(0, len(ids))
    results = []
    for number, account_id in enumerate(ids, start=1):
        try:
            results.append(audits.audit_account(account_id, deep=args.deep))
        except MailbeatError as exc:  # deleted meanwhile
            print(f"mailbeat: account {account_id}: {exc.message}", file=sys.stderr)
        bar.update(number, len(ids))
    bar.finish()
    return _audit_report(results, as_json=args.json)


def _audit_report(results: Sequence[audits.AccountAudit], *, as_json: bool) -> int:
    """The folders' counts; exit status 1 when a folder's audit failed."""
    rows = [(result.account_id, entry) for result in results for entry in result.folders]
    if as_json:
        emit_json(
            [
                {
                    "account_id": account_id,
                    **entry.counts(),
                    "deep": entry.deep,
                    "error": entry.error,
                }
                for account_id, entry in rows
            ]
        )
    else:
        table(
            [
                (
                    account_id,
                    e.folder,
                    e.outcome,
                    e.server,
                    e.expected,
                    e.stored,
                    e.skipped,
                    e.missing,
                    e.repaired,
                    e.objects_checked,
                    e.objects_missing,
                    e.objects_repaired,
                    e.error,
                )
                for account_id, e in rows
            ],
            (
                "ACCOUNT",
                "FOLDER",
                "OUTCOME",
                "SERVER",
                "EXPECTED",
                "STORED",
                "SKIPPED",
                "MISSING",
                "REPAIRED",
                "OBJECTS",
                "OBJ MISSING",
                "OBJ REPAIRED",
                "ERROR",
            ),
        )
    failed = any(entry.outcome == AuditOutcome.FAILED for _id, entry in rows)
    return 1 if failed else 0


def _add_audit_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    acc_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    as_json: argparse.ArgumentParser,
) -> None:
    deep = argparse.ArgumentParser(add_help=False)
    deep.add_argument(
        "--deep", action="store_true", help="also read every object and compare its hash"
    )
    p = acc_sub.add_parser(
        "audit",
        parents=[as_json, deep],
        help="audit it now: the server's messages against the stored ones, repair what is lost",
    )
    p.add_argument("id", type=int)
    p.set_defaults(handler=accounts_audit)
    p = sub.add_parser(
        "audit", parents=[as_json, deep], help="audit mailboxes now, one after another"
    )
    p.add_argument("ids", type=int, nargs="*", help="account ids")
    p.add_argument("--all", action="store_true", help="every scheduled mailbox")
    p.set_defaults(handler=audit_many)


# -- re-parsing -----------------------------------------------------------------------------


def messages_reparse(args: argparse.Namespace) -> int:
    """Re-parse stored messages from their raw bytes, a page per transaction, in this
    process (no worker needed)."""
    if args.all == (args.account is not None):
        raise CommandError("name --account ID, or --all for every account's messages")
    with session_scope() as session:
        total = reparsing.count(session, args.account)
    progress = ProgressBar("reparse " + ("all" if args.all else f"account {args.account}"))
    progress.update(0, total)
    done = reparsing.Reparsed()
    while True:
        page = reparsing.reparse_page(args.account, done.last_id, notify=args.notify)
        if not page.last_id:
            break
        done.add(page)
        progress.update(min(total, done.reparsed + len(done.unreadable)), total)
    progress.finish()
    if args.json:
        emit_json(done.as_dict())
        return 0
    table(
        [(done.reparsed, done.changed, done.attachments_kept, len(done.unreadable), done.notified)],
        ("REPARSED", "CHANGED", "ATTACHMENTS KEPT", "UNREADABLE", "NOTIFIED"),
    )
    for entry in done.unreadable:
        print(f"message {entry.message_id} not re-parsed: {entry.reason}")
    return 0


# -- quarantined messages ---------------------------------------------------------------------


def messages_quarantined(args: argparse.Namespace) -> int:
    with session_scope() as session:
        page = quarantine.list_quarantined(session, limit=args.limit, account_id=args.account)
        total = page.total
        items = [MessageSummary.model_validate(m).model_dump(mode="json") for m in page.items]
    if args.json:
        emit_json({"items": items, "total": total})
        return 0
    print(f"{total} quarantined messages")
    columns = ("id", "account_id", "folder", "uid", "process_failures", "quarantined_at")
    table(
        [[m[key] for key in (*columns, "subject", "process_error")] for m in items],
        ("ID", "ACCOUNT", "FOLDER", "UID", "FAILURES", "SINCE", "SUBJECT", "REASON"),
    )
    return 0


def messages_replay(args: argparse.Namespace) -> int:
    """Quarantined messages handed on again after a fix (by Celery's workers, or here in
    local mode)."""
    if sum((bool(args.ids), args.account is not None, args.all)) != 1:
        raise CommandError("name message ids, or --account ID, or --all (one of them)")
    with session_scope() as session:
        ids: list[int] = []
        for message_id in args.ids:
            ids += quarantine.release(session, message_id=message_id)
        if args.account is not None or args.all:
            ids += quarantine.release(session, account_id=args.account)
        session.commit()
    hand_on(ids)  # after the commit, as every task is sent
    if args.json:
        emit_json({"replayed": len(ids), "message_ids": ids})
    else:
        print(f"replayed {len(ids)}: {', '.join(map(str, ids)) or '-'}")
    return 0


# -- the parser ------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operator's commands, added to `python -m backend.cli`."""
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")

    acc = sub.add_parser("accounts", help="the mailboxes: list, add, show, test, poll, ...")
    acc_sub = acc.add_subparsers(dest="action", required=True)
    p = acc_sub.add_parser("list", parents=[as_json], help="every mailbox with its state")
    p.add_argument("--status", choices=("active", "error", "disabled"))
    p.set_defaults(handler=accounts_list)
    p = acc_sub.add_parser("add", parents=[as_json], help="add a mailbox (password asked)")
    p.add_argument("--email", required=True)
    p.add_argument("--host", required=True, help="IMAP server")
    p.add_argument("--port", type=int, help="default: 993 for ssl, else 143")
    p.add_argument("--security", choices=("ssl", "starttls", "none"), default="ssl")
    p.add_argument("--username", help="default: the email")
    p.add_argument("--password", help="visible to other users in `ps`: prefer the prompt")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--folders", default="INBOX", help="comma-separated (default INBOX)")
    p.add_argument("--interval", type=int, help="seconds between polls")
    p.add_argument("--priority", type=int, help="0 to 9, higher is more urgent")
    p.add_argument("--disabled", action="store_true", help="add it without polling it")
    p.set_defaults(handler=accounts_add)
    for name, handler, text in (
        ("show", accounts_show, "one mailbox: state, folders and recent polls"),
        ("test", accounts_test, "log in and open each folder now"),
        ("poll", accounts_poll, "poll now, in this process, with progress"),
        ("enable", accounts_set_enabled(True), "poll it again"),
        ("disable", accounts_set_enabled(False), "stop polling it"),
        ("delete", accounts_delete, "delete it with all its messages"),
    ):
        p = acc_sub.add_parser(name, parents=[as_json], help=text)
        p.add_argument("id", type=int)
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="do not ask")
        p.set_defaults(handler=handler)

    p = sub.add_parser(
        "status", parents=[as_json], help="one screen: mailboxes by status, lag, queue, workers"
    )
    p.set_defaults(handler=status)

    sch = sub.add_parser("schedules", help="the poll schedule")
    sch_sub = sch.add_subparsers(dest="action", required=True)
    p = sch_sub.add_parser("sync", parents=[as_json], help="rebuild it from the database")
    p.set_defaults(handler=schedules_sync)
    p = sch_sub.add_parser("list", parents=[as_json], help="the entries with last and next run")
    p.set_defaults(handler=schedules_list)

    dl = sub.add_parser("dead-letters", help="webhook deliveries that gave up")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    p = dl_sub.add_parser("list", parents=[as_json], help="newest first")
    p.add_argument("--account", type=int, help="only this account's")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=dead_letters_list)
    p = dl_sub.add_parser("replay", parents=[as_json], help="send them again")
    p.add_argument("ids", type=int, nargs="*", help="dead letter ids")
    p.add_argument("--account", type=int, help="every dead letter of this account")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(handler=dead_letters_replay)

    p = sub.add_parser(
        "backfill", parents=[as_json], help="fetch again what the server holds in a range"
    )
    p.add_argument("id", type=int, help="account id")
    p.add_argument("--folder", action="append", help="repeat for several (default: all)")
    p.add_argument("--since", type=date.fromisoformat, help="YYYY-MM-DD, inclusive")
    p.add_argument("--before", type=date.fromisoformat, help="YYYY-MM-DD, exclusive")
    p.add_argument("--uid-from", type=int)
    p.add_argument("--uid-to", type=int)
    p.add_argument("--dry-run", action="store_true", help="count only")
    p.add_argument("--redeliver", action="store_true", help="send held messages again")
    p.set_defaults(handler=backfill)

    _add_audit_commands(sub, acc_sub, as_json)
    msg = sub.add_parser("messages", help="stored messages")
    msg_sub = msg.add_subparsers(dest="action", required=True)
    p = msg_sub.add_parser(
        "reparse", parents=[as_json], help="decode stored messages again from their raw bytes"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--account", type=int, help="this account's messages")
    which.add_argument("--all", action="store_true", help="every account's messages")
    p.add_argument(
        "--notify", action="store_true", help="send message.reparsed for each message changed"
    )
    p.set_defaults(handler=messages_reparse)
    p = msg_sub.add_parser(
        "quarantined",
        parents=[as_json],
        help="messages set aside after failing processing too often, newest first",
    )
    p.add_argument("--account", type=int, help="only this account's")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=messages_quarantined)
    p = msg_sub.add_parser(
        "replay", parents=[as_json], help="hand quarantined messages on again, after a fix"
    )
    p.add_argument("ids", type=int, nargs="*", help="message ids")
    p.add_argument("--account", type=int, help="every quarantined message of this account")
    p.add_argument("--all", action="store_true", help="every quarantined message")
    p.set_defaults(handler=messages_replay)


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen command; the operator's mistakes are one line, not a traceback."""
    handler: Handler = args.handler
    try:
        return handler(args)
    except (MailbeatError, CommandError) as exc:
        text = exc.message if isinstance(exc, MailbeatError) else str(exc)
        print(f"mailbeat: {text}", file=sys.stderr)
        return 1
