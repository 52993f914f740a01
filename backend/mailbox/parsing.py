"""Parsing a batch of fetched messages in other processes, off the poll's interpreter.

A poll is one Python process doing IMAP, hashing, object writes and inserts in threads;
parsing (backend/mailbox/parser.py, pure Python) held its GIL for most of a first sync.
Batches of at least POOL_MIN_MESSAGES go to PARSE_PROCESSES processes; smaller ones (a
poll that finds a few new messages, a small mailbox's first sync) are parsed in the
calling thread as they are collected, which costs no pickling and starts no process.
The processes are the same parser, so the result is the same either way
(tests/mailbox/test_parsing.py).

Ingestion asks for `start_all_for_storage`: the processes also hash each attachment and
send back the bytes of only those that are to be objects of their own (larger than
ATTACHMENT_INLINE_MAX_BYTES); the others stay inside the raw message, so most parts are
never pickled back.

The pool is made on first use, per process (a Celery prefork child gets its own: a
worker process that never ingests a large batch never starts one), from a fork server
that has imported only the parser: each pool process is a small interpreter, not a copy
of the worker, and nothing is forked from the threaded poller.

A message that kills its parsing process (none is known) does not stop the poll: the
batch is parsed again one message at a time in a new pool, and the message that breaks
it again is stored raw with the reason, as any unparseable message is. A batch parsed
in the poll has only `parse_safely`'s guard: an exception (a message nested too deep
included) is the message's parse error; a crash of the interpreter would be the poll's.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import AuthenticationString  # type: ignore[attr-defined]
from typing import TypeVar

from backend.config import get_settings
from backend.mailbox.parser import ParsedMessage, parse_message

# Below this many messages a batch is parsed in the calling thread: handing a batch of
# 100 to the processes (pickled, through a pipe, each hand-off waiting for the poll's
# GIL) took 35-60 ms of a first sync's wall time and a fifth more CPU, parsing it in the
# poll 12-20 ms (docs/benchmarks.md). Larger batches are a large folder's, whose next
# batch is fetched meanwhile.
POOL_MIN_MESSAGES = 128
# How often a pool process checks that the process it parses for is alive.
WATCH_SECONDS = 1.0
# A parse error as kept on the message row (`parse_error`).
ERROR_MAX = 2000
# The garbage collector's thresholds in a process that ingests (see `relax_gc`).
GC_THRESHOLDS = (100_000, 50, 100)
PROCESS_DIED = "the parsing process died on this message"

# str: why the message could not be parsed (it is stored raw, flagged).
Outcome = ParsedMessage | str


@dataclass
class Part:
    """An attachment as ingestion stores it."""

    filename: str | None
    safe_name: str
    content_type: str
    content_id: str | None
    size: int
    content_hash: str  # sha256 hex of the decoded bytes
    data: bytes | None  # None: kept only inside the raw message (not an object)


# The message's fields (its `attachments` emptied) and its attachments; or why it could
# not be parsed.
Stored = tuple[ParsedMessage, list[Part]] | str
_T = TypeVar("_T")

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_pid = 0


def parse_safely(raw: bytes) -> Outcome:
    """Runs in a pool process (or the calling thread): never raises for a message."""
    try:
        return parse_message(raw)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:ERROR_MAX]


def parse_for_storage(raw: bytes, inline_max: int) -> Stored:
    """Runs in a pool process (or the calling thread): the message parsed as ingestion
    stores it. Its attachments are hashed here, and only those larger than `inline_max`
    keep their bytes: the others stay inside the raw message, and are not sent back."""
    outcome = parse_safely(raw)
    if isinstance(outcome, str):
        return outcome
    parts = [
        Part(
            filename=attachment.filename,
            safe_name=attachment.safe_name,
            content_type=attachment.content_type,
            content_id=attachment.content_id,
            size=len(attachment.data),
            content_hash=hashlib.sha256(attachment.data).hexdigest(),
            data=attachment.data if len(attachment.data) > inline_max else None,
        )
        for attachment in outcome.attachments
    ]
    outcome.attachments = []
    return outcome, parts


def parse_all(raws: Sequence[bytes]) -> list[Outcome]:
    """Each message parsed, in order."""
    died: Outcome = PROCESS_DIED
    return _begin(parse_safely, raws, died)()


def start_all_for_storage(raws: Sequence[bytes], inline_max: int) -> Callable[[], list[Stored]]:
    """Each message parsed for ingestion (`parse_for_storage`), started now; calling
    what this returns waits for the outcomes, in order. A poll starts the next batch
    before it collects this one, so the processes never wait for it."""
    return _begin(partial(parse_for_storage, inline_max=inline_max), raws, PROCESS_DIED)


def _begin(
    function: Callable[[bytes], _T], raws: Sequence[bytes], died: _T
) -> Callable[[], list[_T]]:
    processes = get_settings().parse_processes
    if processes == 0 or len(raws) < POOL_MIN_MESSAGES:
        # Parsed when collected: a poll has started the batch's writes by then.
        return lambda: [function(raw) for raw in raws]
    # One chunk per process: every hand-off between the poll's threads and the pool
    # waits for the poll's GIL, and for a small batch the hand-offs took longer than
    # the parsing (docs/benchmarks.md). The next batch is queued behind, so a process
    # that finishes first is not idle long.
    chunk = -(-len(raws) // processes)
    results: Iterator[_T] | None = None
    try:
        # Every chunk is submitted here; the iterator only collects.
        results = _executor(processes).map(function, raws, chunksize=chunk)
    except BrokenProcessPool:
        _discard()

    def collect() -> list[_T]:
        if results is not None:
            try:
                return list(results)
            except BrokenProcessPool:
                _discard()
        return _one_by_one(function, raws, died, processes)

    return collect


def _one_by_one(
    function: Callable[[bytes], _T], raws: Sequence[bytes], died: _T, processes: int
) -> list[_T]:
    """After a pool process died: each message alone, so only the one that kills its
    process again is lost (stored raw, with `died`)."""
    outcomes: list[_T] = []
    for raw in raws:
        try:
            outcomes.append(_executor(processes).submit(function, raw).result())
        except BrokenProcessPool:
            _discard()
            outcomes.append(died)
    return outcomes


def relax_gc() -> None:
    """Collect cycles less often in this process. Ingesting allocates millions of
    short-lived containers (IMAP tokens, parsed headers, rows), freed by reference
    counting, not as cycles; at Python's default (a young collection every 700 new
    ones) the collector took a tenth of a first sync's time (docs/benchmarks.md)."""
    gc.set_threshold(*GC_THRESHOLDS)


def _executor(processes: int) -> ProcessPoolExecutor:
    global _pool, _pool_pid  # noqa: PLW0603 - one pool per process
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _allow_children()
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["backend.mailbox.parser"])
            _pool = ProcessPoolExecutor(
                processes, mp_context=context, initializer=_start, initargs=(os.getpid(),)
            )
            _pool_pid = os.getpid()
        return _pool


def _start(poller_pid: int) -> None:
    """Each pool process, as it starts."""
    relax_gc()
    _exit_with(poller_pid)


def _exit_with(poller_pid: int) -> None:
    """In each pool process: exit once the process that made the pool is gone. A Celery
    child ends with os._exit or is killed (time limit, out of memory) without shutting
    its pool down, and a pool process waiting for work would wait for ever."""

    def watch() -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            try:
                os.kill(poller_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # alive (a process of another user has taken the pid: not ours)

    threading.Thread(target=watch, name="parser-watch", daemon=True).start()


def _allow_children() -> None:
    """A Celery prefork child is a billiard process that stands in for multiprocessing's
    own: marked daemonic, which multiprocessing refuses children to lest they outlive
    it, and with billiard's authentication key, which multiprocessing cannot hand to a
    fork server. The pool's processes do not outlive the worker: the fork server exits
    with this process, and they exit when their pipe to it closes."""
    current = multiprocessing.current_process()
    config = vars(current)["_config"]
    if type(current).__module__.startswith("multiprocessing"):
        return
    config["daemon"] = False
    config["authkey"] = AuthenticationString(bytes(config["authkey"]))


def _discard() -> None:
    global _pool  # noqa: PLW0603 - one pool per process
    with _lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def shutdown() -> None:
    """Stop this process's pool (tests; settings changed)."""
    _discard()
