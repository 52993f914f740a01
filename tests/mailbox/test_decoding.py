"""Decoding real-world mail as a mail reader shows it. Each test builds the bytes of one
kind of message seen in the wild (raw 8-bit headers in local charsets, mislabelled
charsets, ISO-2022-JP with Microsoft's extensions, undeclared charsets, broken encoded
words) and asserts the Subject, From name, attachment names and text."""

# The corpus is text in many scripts, full-width punctuation and Cyrillic included.
# ruff: noqa: RUF001

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from email.parser import BytesHeaderParser

import pytest

from backend.mailbox import charsets
from backend.mailbox.parser import ParsedMessage, decode_words, parse_message


def message(headers: bytes, body: bytes = b"body\r\n", *, content_type: bytes = b"") -> bytes:
    head = b"From: a@example.org\r\nTo: b@example.org\r\n" if b"From:" not in headers else b""
    return (
        head
        + headers
        + (content_type and b"Content-Type: " + content_type + b"\r\n")
        + (b"\r\n" + body)
    )


def parse(raw: bytes, **kwargs: str) -> ParsedMessage:
    """Parsed both ways (the fast path, the feed parser): the same."""
    fast = parse_message(raw, fast=True, **kwargs)
    assert fast == parse_message(raw, fast=False, **kwargs)
    return fast


def b64(text: str, codec: str) -> bytes:
    return base64.b64encode(text.encode(codec))


# -- raw 8-bit headers ------------------------------------------------------------------


def test_raw_utf8_headers_rfc6532() -> None:
    raw = message(
        "From: Jöhn Doe <jdöe@mächine.example>\r\nSubject: Säying Hello\r\n".encode(),
        content_type=b"text/plain; charset=utf-8",
    )
    parsed = parse(raw)
    assert parsed.subject == "Säying Hello"
    assert parsed.from_addr == "Jöhn Doe <jdöe@mächine.example>"
    assert parsed.decode_fallbacks == []


@pytest.mark.parametrize(
    ("codec", "label", "subject"),
    [
        ("gbk", b"gbk", "管理.doc 通知"),
        ("big5", b"big5", "養樂多線上訂購"),
        ("cp949", b"ks_c_5601-1987", "[멜론] 이용약관 변경 안내"),
        ("cp1251", b"windows-1251", "Рассылка: Уведомление"),
        ("cp932", b"shift_jis", "緊急ミーティング"),
    ],
)
def test_raw_legacy_headers_take_the_first_text_parts_charset(
    codec: str, label: bytes, subject: str
) -> None:
    raw = message(
        b"From: " + "差出人 名".encode(codec, "replace") + b" <s@example.org>\r\n"
        b"Subject: " + subject.encode(codec) + b"\r\nMIME-Version: 1.0\r\n",
        "本文".encode(codec, "replace"),
        content_type=b"text/plain; charset=" + label,
    )
    parsed = parse(raw)
    assert parsed.subject == subject
    assert (
        parsed.from_addr == "差出人 名".encode(codec, "replace").decode(codec) + " <s@example.org>"
    )
    assert "subject" in parsed.decode_fallbacks  # a guess, if a good one: it says so


def test_raw_header_without_a_text_charset_uses_the_setting(
    set_env: Callable[..., None],
) -> None:
    chinese = message(b"Subject: " + "梁祐晟的报告".encode("gb18030") + b"\r\n")
    latin = message(b"Subject: Die Hasen und die Fr\xf6sche\r\n")
    # The default, windows-1252: Western mail reads right, and any byte stays readable.
    assert parse(latin).subject == "Die Hasen und die Frösche"
    assert parse(chinese, header_fallback="gb18030").subject == "梁祐晟的报告"
    set_env(HEADER_FALLBACK_CHARSET="gb18030")
    assert parse(chinese).subject == "梁祐晟的报告"
    assert parse(chinese).decode_fallbacks == ["subject"]


def test_raw_utf8_with_a_stray_byte_stays_utf8() -> None:
    raw = message("Subject: Юникод запрещен \xb4!\r\n".encode("utf-8", "surrogateescape"))
    raw = raw.replace("´".encode(), b"\xb4")
    assert parse(raw).subject == "Юникод запрещен ´!"


def test_raw_iso2022jp_in_a_header() -> None:
    raw = message(b"Subject: " + "会議のお知らせ".encode("iso2022_jp") + b"\r\n")
    assert parse(raw).subject == "会議のお知らせ"


# -- charset labels as WHATWG reads them -------------------------------------------------


@pytest.mark.parametrize(
    ("label", "text", "codec"),
    [
        ("gb2312", "梁祐晟", "gb18030"),  # 祐 is not in GB2312: GBK/GB18030 it is
        ("x-gbk", "林慶美", "gb18030"),
        ("iso-8859-1", "Link Exchange…", "cp1252"),  # 0x85 is windows-1252's ellipsis
        ("us-ascii", "Don’t", "cp1252"),
        ("us-ascii", "Grüße", "utf-8"),  # ASCII says nothing of 8-bit bytes: UTF-8 if so
        ("ks_c_5601-1987", "똠방각하", "cp949"),  # 똠: UHC (windows-949) only
        ("euc-kr", "똠방각하", "cp949"),
        ("windows-874", "เหตุทำให้สมองเสื่อม", "cp874"),
        ("tis-620", "เหตุทำให้", "cp874"),
        ("iso-8859-8-i", "שלום עולם", "iso8859_8"),
        ("big5", "養樂多", "big5hkscs"),
        ("shift_jis", "①髙㈱", "cp932"),  # NEC and IBM extensions: Windows-31J
        ("UnicodeBig", "Grüße ✔", "utf-16-be"),
        ("utf-16", "Grüße ✔", "utf-16-le"),
        ("koi8-r", "Привет", "koi8_r"),
        ("cp936", "简体中文", "gb18030"),  # a label only Python knows
    ],
)
def test_mislabelled_and_unknown_labels(label: str, text: str, codec: str) -> None:
    data = text.encode(codec)
    word = b"=?" + label.encode() + b"?B?" + base64.b64encode(data) + b"?="
    raw = message(
        b"Subject: " + word + b"\r\nMIME-Version: 1.0\r\n",
        data,
        content_type=b"text/plain; charset=" + label.encode(),
    )
    parsed = parse(raw)
    assert parsed.subject == text
    assert parsed.text_body == text
    assert parsed.decode_fallbacks == []


@pytest.mark.parametrize("label", [b"iso-8859-1", b"x-mac-cyrillic", b"windows-1251"])
def test_utf8_under_a_single_byte_label_is_utf8(label: bytes) -> None:
    text = "© 2019 Текущий счёт"
    raw = message(
        b"Subject: =?" + label + b"?B?" + b64(text, "utf-8") + b"?=\r\nMIME-Version: 1.0\r\n",
        text.encode(),
        content_type=b"text/plain; charset=" + label,
    )
    parsed = parse(raw)
    assert (parsed.subject, parsed.text_body) == (text, text)
    assert parsed.decode_fallbacks == ["subject", "text_body"]  # against the label: said


@pytest.mark.parametrize("label", [b"idna", b"undefined", b"punycode", b"unicode_escape"])
def test_python_codecs_that_are_no_charsets_are_unknown_labels(label: bytes) -> None:
    raw = message(
        b"Subject: =?" + label + b"?q?caf=C3=A9?=\r\n",
        "café\r\n".encode(),
        content_type=b"text/plain; charset=" + label,
    )
    parsed = parse(raw)
    assert (parsed.subject, parsed.text_body) == ("café", "café\r\n")


@pytest.mark.parametrize("label", [b"idna", b"punycode"])
@pytest.mark.parametrize(
    ("transfer", "body"),
    [
        (b"8bit", "café\r\n".encode()),
        (b"base64", b"Y2Fmw6kNCg==\r\n"),
        (b"base64", b"Y2Fm\xc3\xa9\r\n"),
    ],
)
def test_8bit_parts_under_such_labels_with_a_transfer_encoding(
    label: bytes, transfer: bytes, body: bytes
) -> None:
    """The transfer encoding read, the codec never asked (it raises on 8-bit bytes)."""
    raw = message(
        b"Subject: s\r\nContent-Transfer-Encoding: " + transfer + b"\r\n",
        body,
        content_type=b"text/plain; charset=" + label,
    )
    parsed = parse(raw)
    assert parsed.text_body is not None
    if body.startswith(b"Y2Fmw6kNCg"):
        assert parsed.text_body == "café\r\n"


def test_every_whatwg_label_names_an_encoding() -> None:
    table = charsets._labels(charsets._WHATWG_TABLE)
    assert len(table) == 228  # the Encoding Standard's whole list
    refused = {label for label in table if charsets.lookup(label) is None}
    # WHATWG's "replacement" labels that Python cannot read; the others are read.
    assert refused == {"iso-2022-cn", "iso-2022-cn-ext", "replacement"}
    assert charsets.lookup(" Latin1 ") == charsets.WINDOWS_1252
    assert charsets.lookup("iso-2022-kr") == charsets.Encoding("iso-2022-kr", ("iso2022_kr",))
    assert charsets.lookup("x-unknown") is None
    assert charsets.lookup("base64") is None


# -- ISO-2022-JP with Microsoft's extensions (CP50220) ---------------------------------

# ① ㈱ № are NEC's row 13, which JIS X 0208 leaves empty: Python's iso2022_jp refuses them.
NEC_SPECIALS = b"\x1b$B-!-j-b\x1b(B"
GREETING = "会議".encode("iso2022_jp")


def test_iso2022jp_with_cp50220_extensions_in_subject_and_body() -> None:
    raw = message(
        b"Subject: =?ISO-2022-JP?B?" + base64.b64encode(NEC_SPECIALS + GREETING) + b"?=\r\n"
        b"MIME-Version: 1.0\r\n",
        NEC_SPECIALS + b" \x1b(I12\x1b(B\r\n",  # half-width katakana
        content_type=b"text/plain; charset=iso-2022-jp",
    )
    parsed = parse(raw)
    assert parsed.subject == "①㈱№会議"
    assert parsed.text_body == "①㈱№ ｱｲ\r\n"
    assert parsed.decode_fallbacks == []


def test_iso2022jp_emoji_codes_never_stay_escapes() -> None:
    # A carrier's emoji code in the IBM extension rows: what Windows shows, no ESC.
    raw = message(b"", b'\x1b$B$"$1!*y_\x1b(B\r\n', content_type=b"text/plain; charset=ISO-2022-JP")
    text = parse(raw).text_body
    assert text is not None and "\x1b" not in text and text.startswith("あけ！")


def test_undeclared_iso2022jp_body_is_recognized_by_its_escapes() -> None:
    raw = message(b"MIME-Version: 1.0\r\n", "すみません。\r\n".encode("iso2022_jp"))
    assert parse(raw).text_body == "すみません。\r\n"


def test_iso2022jp_under_a_utf8_label() -> None:
    raw = message(
        b"", "■ プレス\r\n".encode("iso2022_jp"), content_type=b"text/plain; charset=utf-8"
    )
    assert parse(raw).text_body == "■ プレス\r\n"


# -- bodies that name no charset -------------------------------------------------------


def test_charset_only_on_the_enclosing_multipart_signed() -> None:
    text = "石室诗士施氏，嗜狮，誓食十狮。"
    raw = message(
        b"MIME-Version: 1.0\r\n",
        b"--s\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64(text, "gb18030")
        + b"\r\n--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n",
        content_type=b'multipart/signed; charset=GB18030; boundary="s"; protocol="x"',
    )
    parsed = parse(raw)
    assert parsed.text_body == text
    assert parsed.decode_fallbacks == []


@pytest.mark.parametrize(
    "meta",
    [
        b'<meta http-equiv="Content-Type" content="text/html; charset=windows-1251">',
        b'<META charset="cp1251" />',
    ],
)
def test_html_meta_charset(meta: bytes) -> None:
    html = b"<html><head>" + meta + b"</head><body>" + "Привет, мир".encode("cp1251")
    parsed = parse(message(b"MIME-Version: 1.0\r\n", html, content_type=b"text/html"))
    assert parsed.html_body is not None and parsed.html_body.endswith("<body>Привет, мир")
    assert parsed.decode_fallbacks == []  # named by the document, not guessed


def test_undeclared_legacy_body_is_detected_and_flagged() -> None:
    text = (
        "Здравствуйте, Елена! Спасибо за ваше сообщение. На следующей неделе мы обсудим "
        "условия перевода и сроки.\r\n"
    )
    parsed = parse(message(b"MIME-Version: 1.0\r\n", text.encode("cp1251")))
    assert parsed.text_body == text
    assert parsed.decode_fallbacks == ["text_body"]


def test_undeclared_body_in_the_charset_of_the_encoded_subject() -> None:
    text = "Türkcellden tanıdık buldum, ilk partide alıyorum inşallah.\r\n"
    raw = message(
        b"Subject: =?iso-8859-9?Q?=DCye_oldu=F0unuz?=\r\nMIME-Version: 1.0\r\n",
        text.encode("cp1254"),
        content_type=b"text/plain",
    )
    parsed = parse(raw)
    assert parsed.subject == "Üye olduğunuz"
    assert parsed.text_body == text
    assert parsed.decode_fallbacks == ["text_body"]


def test_undeclared_utf8_body() -> None:
    parsed = parse(message(b"", "Grüße ✔\r\n".encode()))
    assert parsed.text_body == "Grüße ✔\r\n"
    assert parsed.decode_fallbacks == []


def test_utf8_body_with_latin1_quoted_in_it_and_a_line_broken_in_a_character() -> None:
    latin = message(
        b"", b"Det h\xe4r \xe4r ett meddelande\r\n", content_type=b"text/plain; charset=utf-8"
    )
    parsed = parse(latin)
    assert parsed.text_body == "Det här är ett meddelande\r\n"
    assert parsed.decode_fallbacks == ["text_body"]
    broken = "Марина".encode()
    cut = message(
        b"", broken[:7] + b"\r\n" + broken[7:] + b"\r\n", content_type=b"text/plain; charset=utf-8"
    )
    assert parse(cut).text_body == "Мари\r\nна\r\n"  # the line break after the character


# -- RFC 2047 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # Whitespace between adjacent encoded words is dropped (folding included)...
        (b"=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),
        (b"=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),
        # ...and kept between an encoded word and plain text.
        (b"=?utf-8?q?friendly_=E2=9C=94?= (1476358788189)", "friendly ✔ (1476358788189)"),
        (b"Re: =?utf-8?q?caf=C3=A9?= ok", "Re: café ok"),
        (b"=?utf-8?q?caf=C3=A9?=,x", "café,x"),
        # A character split between two words is whole again.
        (b"=?utf-8?B?4pw=?= =?utf-8?B?lA==?=", "✔"),
        # Words in two charsets.
        (b"=?iso-8859-1?q?M=FCller?= =?koi8-r?b?8NLJ18XU?=", "MüllerПривет"),
        # An encoded word holding raw 8-bit bytes.
        (b"=?iso-8859-1?Q?Die_Hasen_und_die_Fr\xf6sche?=", "Die Hasen und die Frösche"),
        # RFC 2231's language in an encoded word.
        (b"=?utf-8*de?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),
        # Malformed base64: missing padding, a stray character, one character too many.
        (b"=?UTF-8?B?w6nDqA?=", "éè"),
        (b"=?utf-8?b?w6n!DqA==?=", "éè"),
        (b"=?utf-8?B?w6nDqAx?=", "éè"),
        (b"=?UTF-8?B?nnDusSNdG92w6Fuw61f?= report", None),  # garbage, but no exception
        # Unknown charsets: the bytes as raw header bytes are read.
        (b"=?x-unknown?q?caf=C3=A9?=", "café"),
        (b"=?unknown-8bit?q?caf=E9?=", "café"),
    ],
)
def test_encoded_words(header: bytes, expected: str | None) -> None:
    parsed = parse(message(b"Subject: " + header + b"\r\n"))
    if expected is None:
        assert parsed.subject is not None and parsed.subject.endswith(" report")
        assert parsed.decode_fallbacks == ["subject"]
    else:
        assert parsed.subject == expected


def test_from_name_in_encoded_words() -> None:
    raw = message(
        b'From: "=?GB18030?B?sKzA8r16ILeivP7Iyw==?=" <alice@example.com>\r\n'
        b"To: =?utf-8?b?5pel5pys6Kqe?= <b@example.org>, plain@example.org\r\n"
        b"Cc: =?ks_c_5601-1987?B?" + b64("김 현진", "cp949") + b"?= <k@example.org>\r\n"
    )
    parsed = parse(raw)
    assert parsed.from_addr == "艾莉絲 发件人 <alice@example.com>"
    assert parsed.to_addrs == ["日本語 <b@example.org>", "plain@example.org"]
    assert parsed.cc_addrs == ["김 현진 <k@example.org>"]


def test_a_header_value_from_another_policy_keeps_its_bytes() -> None:
    """webhooks/events.py reads headers with the default (compat32) policy: Header
    objects, whose 8-bit bytes are recovered, not turned into U+FFFD."""
    headers = BytesHeaderParser().parsebytes("Subject: Säying Hello\r\n\r\n".encode())
    assert decode_words(headers["subject"]) == "Säying Hello"
    latin = BytesHeaderParser().parsebytes(b"Subject: Fr\xf6sche\r\n\r\n")
    assert decode_words(latin["subject"]) == "Frösche"
    assert decode_words(latin["subject"], header_fallback="gb18030") != "Frösche"


# -- transfer encodings and attachment names --------------------------------------------


@pytest.mark.parametrize(
    "encoding",
    [
        b"Content-Transfer-Encoding: quoted-printable\r\n \r\n",  # last header line: a space
        b"Content-Transfer-Encoding: quoted printable\r\n\r\n",
        b"Content-Transfer-Encoding: Quoted-Printable \r\n\r\n",
    ],
)
def test_quoted_printable_body_is_decoded_whatever_the_header_block_ends_with(
    encoding: bytes,
) -> None:
    raw = (
        b"From: a@example.org\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=UTF-8\r\n"
        + encoding
        + b"Welcome to APPNAME=E2=84=A2.\r\n"
    )
    text = parse(raw).text_body
    assert text is not None and text.strip() == "Welcome to APPNAME™."


def test_a_field_name_with_a_space_does_not_end_the_header_block() -> None:
    """Mail readers end the header block at the blank line; the feed parser at the first
    line that is no header, which made the rest of the block the body."""
    raw = (
        "From: a@example.org\r\nSubject : Grüße\r\n".encode()
        + b"X-Odd/name\t !: value\r\n continued\r\n"
        + b"Content-Type: text/plain; charset=GB18030\r\nContent-Transfer-Encoding: base64\r\n"
        + b"\r\n"
        + b64("石室诗士施氏", "gb18030")
        + b"\r\n"
    )
    parsed = parse(raw)
    assert parsed.subject == "Grüße"
    assert parsed.text_body == "石室诗士施氏"


def attachment(disposition: bytes, content_type: bytes = b"application/msword") -> bytes:
    return message(
        b"Subject: files\r\nMIME-Version: 1.0\r\n",
        b"--b\r\nContent-Type: text/plain; charset=gbk\r\n\r\n"
        + "正文".encode("gbk")
        + b"\r\n--b\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Disposition: "
        + disposition
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\nZGF0YQ==\r\n--b--\r\n",
        content_type=b'multipart/mixed; boundary="b"',
    )


@pytest.mark.parametrize(
    ("disposition", "content_type", "guessed"),
    [
        # RFC 2231 continuations in GBK, the first part encoded, the second not.
        (b"attachment; filename*0*=gbk''%B9%DC%C0%ED; filename*1=.doc", b"application/msword", 0),
        (b"attachment; filename*=gbk''%B9%DC%C0%ED.doc", b"application/msword", 0),
        (b"attachment; filename*=GB2312'zh'%B9%DC%C0%ED.doc", b"application/msword", 0),
        # Raw 8-bit bytes: read in the charset of the message's text (GBK), a guess.
        (b'attachment; filename="' + "管理.doc".encode("gbk") + b'"', b"application/msword", 1),
        # RFC 2047 in name= and inside filename's quotes, as Outlook writes them.
        (
            b"attachment",
            b'application/msword; name="=?gb2312?B?' + b64("管理", "gbk") + b'?=.doc"',
            0,
        ),
        (b'attachment; filename="=?UTF-8?B?566h55CG?=.doc"', b"application/msword", 0),
    ],
)
def test_attachment_names(disposition: bytes, content_type: bytes, guessed: int) -> None:
    parsed = parse(attachment(disposition, content_type))
    assert parsed.text_body == "正文"
    (document,) = parsed.attachments
    assert document.filename == "管理.doc"
    assert document.safe_name == "管理.doc"
    assert parsed.decode_fallbacks == (["attachments[0].filename"] if guessed else [])


# -- never an exception, never a lone surrogate -----------------------------------------


def test_random_damage_never_raises_and_gives_valid_text() -> None:
    rng = random.Random(26)
    pieces = [
        b"=?",
        b"?=",
        b"?B?",
        b"?Q?",
        b"=?utf-8?b?",
        b"=?iso-2022-jp?B?GyRC",
        b"\x1b$B",
        b"\x1b(I",
        b"\xff",
        b"\xe4\xb8",
        b"\x85",
        b"=",
        b"==",
        b"%",
        b"*0*=",
        b"''",
        b'"',
        b"\r\n ",
        b"\x00",
    ]
    for _ in range(300):
        junk = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        raw = message(
            b"From: " + junk + b" <x@example.org>\r\nSubject: " + junk + b"\r\n",
            junk,
            content_type=b"text/plain; name=" + junk,
        )
        parsed = parse(raw)
        for text in (parsed.subject, parsed.from_addr, parsed.text_body):
            if text is not None:
                text.encode("utf-8")  # no lone surrogates: valid for PostgreSQL
                assert "\x00" not in text
