"""Attachment names show what they are (issue 31: safe_name kept U+202E and C1 controls,
so '\\u202egnp.exe' displayed as 'exe.png')."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from backend.mailbox.parser import safe_filename
from backend.messages.endpoints import _download_headers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("\u202egnp.exe", "gnp.exe"),  # RIGHT-TO-LEFT OVERRIDE
        ("invoice\u2066\u2067\u2068exe.pdf\u2069", "invoiceexe.pdf"),  # isolates
        ("a\u200bb\u200c\u200d\u2060c\ufeff.txt", "abc.txt"),  # zero-width
        ("\u200e\u200f\u061cx.txt", "x.txt"),  # marks
        ("x\x85y\x9b.txt", "x_y_.txt"),  # C1: NEL, CSI
        ("\u202e", "attachment-3.bin"),  # nothing left
    ],
)
def test_safe_name_drops_what_hides_or_reorders_a_name(name: str, expected: str) -> None:
    assert safe_filename(name, index=3, content_type="application/x-unknown") == expected


def test_the_download_name_drops_them_too() -> None:
    disposition = _download_headers("gnp.exe", "\u202egnp\x85\u200b.exe")["Content-Disposition"]
    assert disposition.startswith('attachment; filename="gnp.exe"')
    assert unquote(disposition.split("filename*=UTF-8''", 1)[1]) == "gnp.exe"
