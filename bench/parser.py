"""The parser over a directory of .eml files, and its speed on generated mail, this
checkout against a baseline commit in the same run:

    python -m bench.parser DIR [--baseline REF] [--generated 2000] [--rounds 5] [--show]

For each variant (a process of its own, with that checkout first on sys.path) it reports
for DIR: messages/s (the best of `--rounds` passes), messages the parser could not read,
the decoded fields (subject, from, to, cc, text, HTML, attachment names), how many
needed a fallback (the parser's `decode_fallbacks`; the baseline may have none), and
how many still hold U+FFFD, raw escape codes (ESC) or UTF-8 read as Latin-1 ("Ã©").
Then the speed on `--generated` messages of the ingest benchmark
(`bench.ingest.build_message`, seed 7), parsed `--rounds` times, the variants taking
turns; the best round counts. Times are the child's CPU time (`process_time`), which
other load on the machine disturbs less than wall-clock time. `--show` prints each
field that still holds U+FFFD, ESC or that mojibake.

The baseline runs from a copy of REF (git archive) with this file's child code, which
only uses what both versions have (`parse_message`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUSPECT = {
    "U+FFFD": re.compile("\ufffd"),
    "ESC": re.compile("\x1b"),
    "mojibake": re.compile("[ÃÂ][\x80-\xbf]|Ã[©¨¼¶¤]"),
}


def fields(parsed: Any) -> dict[str, str]:
    found = {
        "subject": parsed.subject,
        "from_addr": parsed.from_addr,
        "to_addrs": " | ".join(parsed.to_addrs) or None,
        "cc_addrs": " | ".join(parsed.cc_addrs) or None,
        "text_body": parsed.text_body,
        "html_body": parsed.html_body,
    }
    for index, attachment in enumerate(parsed.attachments):
        found[f"attachments[{index}].filename"] = attachment.filename
    return {name: value for name, value in found.items() if value}


def child(args: argparse.Namespace) -> None:
    """One variant, the checkout first on sys.path: DIR once, or a round of generated."""
    sys.path.insert(0, args.checkout)
    from backend.mailbox.parser import parse_message

    if args.generated:
        from bench.ingest import build_message

        rng = random.Random(7)
        raws = [build_message(i, rng) for i in range(args.generated)]
        start = time.process_time()
        for raw in raws:
            parse_message(raw)
        print(json.dumps({"seconds": time.process_time() - start}))
        return
    paths = sorted(Path(args.directory).rglob("*.eml"))
    raws = [path.read_bytes() for path in paths]
    result: dict[str, Any] = dict.fromkeys(["failed", "fields", "fallback"], 0)
    result.update(dict.fromkeys(SUSPECT, 0))
    shown: list[str] = []
    result["seconds"] = float("inf")
    for _ in range(args.rounds):  # the best of the rounds
        start = time.process_time()
        outcomes: list[Any] = []
        for raw in raws:
            try:
                outcomes.append(parse_message(raw))
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        result["seconds"] = min(result["seconds"], time.process_time() - start)
    result["messages"] = len(raws)
    for path, parsed in zip(paths, outcomes, strict=True):
        if isinstance(parsed, str):
            result["failed"] += 1
            shown.append(f"{path.relative_to(args.directory)}: {parsed[:200]}")
            continue
        decoded = fields(parsed)
        result["fields"] += len(decoded)
        result["fallback"] += len(getattr(parsed, "decode_fallbacks", []))
        for name, value in decoded.items():
            for kind, pattern in SUSPECT.items():
                if (found := pattern.search(value)) is not None:
                    result[kind] += 1
                    start_at = max(0, found.start() - 30)
                    excerpt = value[start_at : start_at + 80]
                    shown.append(f"{path.relative_to(args.directory)} {name} {kind}: {excerpt!r}")
    result["shown"] = shown
    print(json.dumps(result))


def _export(ref: str, target: Path) -> Path:
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "backend"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _run(checkout: Path, *extra: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.parser", "--child", "--checkout", str(checkout)]
    output = subprocess.run(
        [*command, *extra], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", nargs="?", default="")
    parser.add_argument("--baseline", help="a commit to measure first (e.g. main)")
    parser.add_argument("--generated", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--show", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--checkout", default=str(ROOT))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-parser-") as work:
        variants = {"this checkout": ROOT}
        if args.baseline:
            variants = {args.baseline: _export(args.baseline, Path(work) / "baseline"), **variants}
        if args.directory:
            print(f"{args.directory}:")
            for name, checkout in variants.items():
                r = _run(checkout, args.directory, "--generated", "0", "--rounds", str(args.rounds))
                print(
                    f"  {name}: {r['messages']} messages in {r['seconds']:.2f} s "
                    f"({r['messages'] / r['seconds']:.0f}/s), {r['failed']} not parsed; "
                    f"{r['fields']} fields, {r['fallback']} needed a fallback, "
                    f"{r['U+FFFD']} hold U+FFFD, {r['ESC']} ESC, {r['mojibake']} mojibake"
                )
                if args.show:
                    for line in r["shown"]:
                        print(f"    {line}")
        if args.generated:
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, checkout in variants.items():
                    seconds = _run(checkout, "--generated", str(args.generated))["seconds"]
                    best[name] = min(best.get(name, seconds), seconds)
            print(f"generated ({args.generated} messages, best of {args.rounds}):")
            for name, seconds in best.items():
                print(f"  {name}: {seconds:.2f} s, {args.generated / seconds:.0f} messages/s")
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
    print(f"uptime: {load.strip()}")


if __name__ == "__main__":
    main()
