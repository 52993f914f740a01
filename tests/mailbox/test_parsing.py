"""backend.mailbox.parsing: a batch parsed in pool processes is what the parser gives in
the calling thread, message for message, errors included."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import billiard  # type: ignore[import-untyped]
import pytest

from backend.mailbox import parsing
from backend.mailbox.parser import ParsedMessage
from tests.support.mail import corpus, generated
from tests.support.wait import wait_for


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[None]:
    parsing.shutdown()
    yield
    parsing.shutdown()


def too_deep(depth: int = 1500) -> bytes:
    """Nested deeper than the parser's recursion allows: it raises."""
    raw = b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(depth):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level, level + 1)
    return raw + b"--b%d\r\nContent-Type: text/plain\r\n\r\nhi\r\n" % depth


def batch() -> list[bytes]:
    """Enough messages to go to the pool."""
    raws = [
        *corpus(),
        *(generated(i, attachment=os.urandom(i * 1000)) for i in range(1, 20)),
    ]
    raws += [generated(i) for i in range(parsing.POOL_MIN_MESSAGES - len(raws))]
    return [*raws, too_deep(), b"", b"\xff\xfe not a message \x00"]


def test_the_pool_agrees_with_the_parser_in_this_thread(set_env: Callable[..., None]) -> None:
    raws = batch()
    set_env(PARSE_PROCESSES=0)
    here = parsing.parse_all(raws)
    set_env(PARSE_PROCESSES=2)
    pooled = parsing.parse_all(raws)

    assert pooled == here
    assert sum(isinstance(outcome, ParsedMessage) for outcome in pooled) >= len(raws) - 1
    assert isinstance(pooled[-3], str)  # the one too deep to parse: its reason
    assert pooled[-3].startswith("RecursionError")
    assert _pool_processes()  # the pool did the parsing


def test_parsed_for_storage_in_the_pool_sends_back_only_large_parts(
    set_env: Callable[..., None],
) -> None:
    """The pool hashes each attachment and sends back the bytes of only those larger than
    the limit; the rest is what the parser gives in this thread."""
    raws = batch()
    set_env(PARSE_PROCESSES=0)
    here = parsing.parse_all(raws)
    set_env(PARSE_PROCESSES=2)
    stored = parsing.start_all_for_storage(raws, 9_500)()
    assert _pool_processes()

    large = small = 0
    for full, outcome in zip(here, stored, strict=True):
        if isinstance(full, str):
            assert outcome == full
            continue
        assert not isinstance(outcome, str)
        fields, parts = outcome
        assert fields.attachments == []
        assert fields == ParsedMessage(**{**vars(full), "attachments": []})
        assert len(parts) == len(full.attachments)
        for part, attachment in zip(parts, full.attachments, strict=True):
            assert (part.filename, part.safe_name, part.content_type, part.content_id) == (
                attachment.filename,
                attachment.safe_name,
                attachment.content_type,
                attachment.content_id,
            )
            assert part.size == len(attachment.data)
            assert part.content_hash == hashlib.sha256(attachment.data).hexdigest()
            if part.size > 9_500:
                assert part.data == attachment.data
                large += 1
            else:
                assert part.data is None
                small += 1
    assert large >= 5 and small >= 5


def _in_a_daemonic_child(count: int) -> int:
    outcomes = parsing.parse_all([generated(i) for i in range(count)])
    return sum(isinstance(outcome, ParsedMessage) for outcome in outcomes)


def test_a_celery_prefork_child_parses_in_its_own_pool(set_env: Callable[..., None]) -> None:
    """Celery's prefork children are daemonic billiard processes: the pool starts there
    too (multiprocessing refuses children to a daemonic process unless told otherwise)."""
    set_env(PARSE_PROCESSES=2)
    # Spawned, not forked: a forked child would inherit this test process's fork server.
    children = billiard.get_context("spawn").Pool(1)
    try:
        count = parsing.POOL_MIN_MESSAGES
        assert children.map(_in_a_daemonic_child, [count]) == [count]
    finally:
        children.terminate()
        children.join()


def test_a_small_batch_is_parsed_here(set_env: Callable[..., None]) -> None:
    set_env(PARSE_PROCESSES=2)
    outcomes = parsing.parse_all([generated(i) for i in range(parsing.POOL_MIN_MESSAGES - 1)])
    assert all(isinstance(outcome, ParsedMessage) for outcome in outcomes)
    assert _pool_processes() == []


def test_a_dead_pool_process_does_not_lose_the_batch(set_env: Callable[..., None]) -> None:
    set_env(PARSE_PROCESSES=2)
    raws = [generated(i) for i in range(parsing.POOL_MIN_MESSAGES)]
    expected = parsing.parse_all(raws)
    for pid in _pool_processes():
        os.kill(pid, signal.SIGKILL)

    # The pool is found broken, and the batch parsed again in a new one.
    assert parsing.parse_all(raws) == expected
    wait_for(lambda: _pool_processes() or None, "a new pool")


def _pool_processes() -> list[int]:
    """The pool's processes: children of this process's fork server."""
    mine = str(os.getpid())
    servers = [pid for pid in _children_of(mine)]
    return [pid for server in servers for pid in _children_of(str(server))]


def _children_of(parent: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == parent and b"multiprocessing" in cmdline:
            found.append(int(entry.name))
    return found


def test_the_pool_goes_when_its_process_is_killed() -> None:
    """A Celery child killed at its hard time limit leaves no parsing processes behind."""
    script = (
        "import os, sys, time\n"
        "from backend.mailbox import parsing\n"
        "from tests.support.mail import generated\n"
        "if __name__ == '__main__':\n"
        "    parsing.parse_all([generated(i) for i in range(parsing.POOL_MIN_MESSAGES)])\n"
        "    print('parsed', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "parsed"
        servers = _children_of(str(child.pid))
        pool = [pid for server in servers for pid in _children_of(str(server))]
        assert servers and pool
    finally:
        child.kill()
        child.wait()
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in [*servers, *pool]) or None,
        "the fork server and the pool processes to exit",
    )


def test_pool_processes_collect_garbage_less_often(set_env: Callable[..., None]) -> None:
    set_env(PARSE_PROCESSES=1)
    parsing.parse_all([generated(i) for i in range(parsing.POOL_MIN_MESSAGES)])
    pool = parsing._executor(1)
    assert pool.submit(gc.get_threshold).result(timeout=60) == parsing.GC_THRESHOLDS
