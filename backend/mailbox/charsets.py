"""Bytes to text as mail readers do it: charset labels through the WHATWG Encoding
Standard's label table, decoders for what Python's codecs read differently (ISO-2022-JP
with Microsoft's CP50220 extensions, WHATWG's single-byte tables), the HTML meta
charset, and detection for text that names no charset (charset-normalizer, imported
here only).

Every decoder here either decodes strictly (`decode`: None when the bytes are not in
that encoding) or never fails (`decode_lenient`: the text and whether it is clean, i.e.
holds no replacement character it had to add).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

from charset_normalizer import from_bytes

# WHATWG Encoding Standard, "Encodings": each encoding's name, then all its labels (a
# label is matched after trimming ASCII whitespace and lower-casing). Indented lines go on.
_WHATWG_TABLE = """
utf-8 unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8
ibm866 866 cp866 csibm866 ibm866
iso-8859-2 csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 iso_8859-2:1987
    l2 latin2
iso-8859-3 csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 iso_8859-3:1988
    l3 latin3
iso-8859-4 csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 iso_8859-4:1988
    l4 latin4
iso-8859-5 csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5
    iso_8859-5:1988
iso-8859-6 arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6
    iso-8859-6-e iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987
iso-8859-7 csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7
    iso88597 iso_8859-7 iso_8859-7:1987 sun_eu_greek
iso-8859-8 csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8
    iso88598 iso_8859-8 iso_8859-8:1988 visual
iso-8859-8-i csiso88598i iso-8859-8-i logical
iso-8859-10 csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6
iso-8859-13 iso-8859-13 iso8859-13 iso885913
iso-8859-14 iso-8859-14 iso8859-14 iso885914
iso-8859-15 csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9
iso-8859-16 iso-8859-16
koi8-r cskoi8r koi koi8 koi8-r koi8_r
koi8-u koi8-ru koi8-u
macintosh csmacintosh mac macintosh x-mac-roman
windows-874 dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874
windows-1250 cp1250 windows-1250 x-cp1250
windows-1251 cp1251 windows-1251 x-cp1251
windows-1252 ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100
    iso8859-1 iso88591 iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252
windows-1253 cp1253 windows-1253 x-cp1253
windows-1254 cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9
    iso_8859-9:1989 l5 latin5 windows-1254 x-cp1254
windows-1255 cp1255 windows-1255 x-cp1255
windows-1256 cp1256 windows-1256 x-cp1256
windows-1257 cp1257 windows-1257 x-cp1257
windows-1258 cp1258 windows-1258 x-cp1258
x-mac-cyrillic x-mac-cyrillic x-mac-ukrainian
gbk chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk
gb18030 gb18030
big5 big5 big5-hkscs cn-big5 csbig5 x-x-big5
euc-jp cseucpkdfmtjapanese euc-jp x-euc-jp
iso-2022-jp csiso2022jp iso-2022-jp
shift_jis csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis
euc-kr cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601
    ksc_5601 windows-949
replacement csiso2022kr hz-gb-2312 iso-2022-cn iso-2022-cn-ext iso-2022-kr replacement
utf-16be unicodefffe utf-16be
utf-16le csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le
x-user-defined x-user-defined
"""


def _labels(table: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    name = ""
    for line in table.strip().splitlines():
        words = line.split()
        if not line.startswith(" "):
            name, words = words[0], words[1:]
        labels.update(dict.fromkeys(words, name))
    return labels


# The Python codecs that read each encoding as WHATWG defines it, tried in order. GBK is
# decoded as GB18030 (WHATWG's GBK decoder is GB18030's), Big5 with HKSCS, Shift_JIS as
# Microsoft's CP932, EUC-KR as Microsoft's CP949 (UHC).
_CODECS: dict[str, tuple[str, ...]] = {
    "utf-8": ("utf-8",),
    "ibm866": ("cp866",),
    "iso-8859-8-i": ("iso8859_8",),
    "koi8-r": ("koi8_r",),
    "koi8-u": ("koi8_u",),
    "macintosh": ("mac_roman",),
    "windows-874": ("cp874",),
    "x-mac-cyrillic": ("mac_cyrillic",),
    "gbk": ("gb18030",),
    "gb18030": ("gb18030",),
    "big5": ("big5hkscs", "cp950"),
    "euc-jp": ("euc_jp", "euc_jis_2004"),
    "iso-2022-jp": ("iso2022_jp", "iso2022_jp_2004", "iso2022_jp_2"),
    "shift_jis": ("cp932", "shift_jis_2004"),
    "euc-kr": ("cp949",),
    "utf-16be": ("utf-16-be",),
    "utf-16le": ("utf-16-le",),
    "x-user-defined": ("latin-1",),
    **{f"iso-8859-{n}": (f"iso8859_{n}",) for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)},
    **{f"windows-{n}": (f"cp{n}",) for n in range(1250, 1259)},
}
# WHATWG turns these into one replacement character (a safety rule for browsers); mail
# readers, and mailbeat, decode them, as they are what the label says.
_REPLACEMENT_LABELS = {
    "csiso2022kr": "iso2022_kr",
    "iso-2022-kr": "iso2022_kr",
    "hz-gb-2312": "hz",
}
# Java's names for UTF-16, which some mailers write as the charset.
_EXTRA_LABELS = {
    "unicodebig": "utf-16be",
    "unicodebigunmarked": "utf-16be",
    "unicodelittle": "utf-16le",
    "unicodelittleunmarked": "utf-16le",
    "x-unicode": "utf-16le",
}
# Python's name of a codec -> WHATWG's encoding, for labels only Python knows (cp936).
_PYTHON_NAMES = {
    "ascii": "windows-1252",
    "latin-1": "windows-1252",
    "iso8859-1": "windows-1252",
    "gb2312": "gbk",
    "gbk": "gbk",
    "gb18030": "gb18030",
    "big5": "big5",
    "big5hkscs": "big5",
    "cp950": "big5",
    "cp932": "shift_jis",
    "shift_jis": "shift_jis",
    "euc_jp": "euc-jp",
    "cp949": "euc-kr",
    "euc_kr": "euc-kr",
    "iso2022_jp": "iso-2022-jp",
    "iso2022_jp_ext": "iso-2022-jp",
    "iso2022_jp_1": "iso-2022-jp",
    "utf-16-be": "utf-16be",
    "utf-16-le": "utf-16le",
    "utf-16": "utf-16le",
    "utf-8": "utf-8",
}
_LABELS = _labels(_WHATWG_TABLE)
# Python codecs that are not charsets: bytes to bytes, escapes, host names, none at all.
_NOT_CHARSETS = frozenset(
    {"base64", "quopri", "uu", "zlib", "bz2", "hex", "rot-13", "undefined", "idna"}
    | {"punycode", "unicode-escape", "raw-unicode-escape", "charmap"}
)
# Escape sequences of ISO-2022-JP's double-byte sets (and its half-width katakana).
_ISO2022JP = re.compile(rb"\x1b(?:\$[@B]|\$\(D|\(I)")
_META = re.compile(rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]{1,40})", re.I)
DETECT_BYTES = 64 * 1024


@dataclass(frozen=True)
class Encoding:
    name: str  # WHATWG's name, or Python's for a label only Python knows
    codecs: tuple[str, ...]  # Python codecs tried strictly, in order

    @property
    def single_byte(self) -> bool:
        return self.name.startswith(("windows-", "iso-8859-", "koi8", "mac", "ibm", "x-mac"))


UTF8 = Encoding("utf-8", ("utf-8",))
WINDOWS_1252 = Encoding("windows-1252", ("cp1252",))
ISO_2022_JP = Encoding("iso-2022-jp", _CODECS["iso-2022-jp"])


@lru_cache(maxsize=512)
def lookup(label: str | None) -> Encoding | None:
    """The encoding a charset label names as mail readers read it; None for a label
    neither WHATWG nor Python knows (the text is then treated as undeclared)."""
    if not label:
        return None
    key = label.strip("\t\n\f\r \"';").lower()
    name = _LABELS.get(key) or _EXTRA_LABELS.get(key)
    if name is None and "_" in key:
        name = _LABELS.get(key.replace("_", "-"))
    if name == "replacement":
        codec = _REPLACEMENT_LABELS.get(key)
        return Encoding(key, (codec,)) if codec else None
    if name is not None:
        return Encoding(name, _CODECS[name])
    try:
        python_name = codecs.lookup(key).name
    except (LookupError, ValueError):
        return None
    if python_name in _PYTHON_NAMES:
        return lookup(_PYTHON_NAMES[python_name])
    if python_name in _NOT_CHARSETS:
        return None
    return Encoding(python_name, (python_name,))


def _bom(data: bytes) -> tuple[Encoding, bytes] | None:
    """A byte order mark decides the encoding, whatever the label says (WHATWG)."""
    if data[:3] == b"\xef\xbb\xbf":
        return UTF8, data[3:]
    if data[:2] == b"\xff\xfe":
        return Encoding("utf-16le", ("utf-16-le",)), data[2:]
    if data[:2] == b"\xfe\xff":
        return Encoding("utf-16be", ("utf-16-be",)), data[2:]
    return None


def decode(data: bytes, encoding: Encoding) -> str | None:
    """The text, or None when the bytes are not valid in that encoding."""
    if data[:1] in (b"\xef", b"\xff", b"\xfe") and (bom := _bom(data)) is not None:
        encoding, data = bom
    if (
        b"\x1b" in data
        and encoding.name != "iso-2022-jp"
        and _ISO2022JP.search(data)
        and data.isascii()
    ):
        encoding = ISO_2022_JP  # ISO-2022-JP under another label (or none): its escapes say so
    for codec in encoding.codecs:
        try:
            text = data.decode(codec)
        except UnicodeError:
            continue
        return _user_defined(text) if encoding.name == "x-user-defined" else text
    if encoding.name == "iso-2022-jp":
        text, clean = decode_iso2022jp(data)
        return text if clean else None
    return None


def decode_lenient(data: bytes, encoding: Encoding) -> tuple[str, bool]:
    """Never fails: the text and whether it is clean (no replacement character added).
    Single-byte encodings map bytes they leave undefined to the C1 control of the same
    value, as WHATWG's tables do; others replace what cannot be read."""
    text = decode(data, encoding)
    if text is not None:
        return text, True
    if encoding.name == "iso-2022-jp" or _ISO2022JP.search(data):
        return decode_iso2022jp(data)
    if encoding.name == "utf-8":
        repaired = _rejoin_utf8(data)
        if repaired is not None:
            return repaired, True
        # Bytes that are not UTF-8 amid UTF-8 are nearly always windows-1252 (a quoted
        # Latin-1 line): read so, not as U+FFFD; only a sequence cut off at the end is.
        return data.decode("utf-8", "mailbeat-utf8"), False
    if encoding.single_byte:
        text = data.decode(encoding.codecs[0], "mailbeat-c1")
        return text, "\ufffd" not in text
    try:
        return data.decode(encoding.codecs[0], "replace"), False
    except UnicodeError:  # a codec that cannot replace: every byte as windows-1252 reads it
        return data.decode("cp1252", "mailbeat-c1"), False


def _c1(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    chunk = error.object[error.start : error.end]
    return "".join(chr(b) if 0x80 <= b <= 0x9F else "\ufffd" for b in chunk), error.end


def _utf8_fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    if error.reason == "unexpected end of data":
        return "\ufffd", error.end
    return error.object[error.start : error.end].decode("cp1252", "mailbeat-c1"), error.end


codecs.register_error("mailbeat-c1", _c1)
codecs.register_error("mailbeat-utf8", _utf8_fallback)


def _user_defined(text: str) -> str:
    return "".join(chr(0xF700 + ord(c)) if ord(c) >= 0x80 else c for c in text)


_BROKEN_LINE = re.compile(rb"([\xc2-\xf4][\x80-\xbf]{0,2})(\r?\n)([\x80-\xbf]{1,3})")


def _rejoin_utf8(data: bytes) -> str | None:
    """UTF-8 whose lines some mailer broke inside a character: the character joined."""
    joined = _BROKEN_LINE.sub(rb"\1\3\2", data)
    if joined == data:
        return None
    try:
        return joined.decode("utf-8")
    except UnicodeDecodeError:
        return None


_UTF8_SEQUENCE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)
_HIGH = re.compile(rb"[\x80-\xff]")


def mostly_utf8(data: bytes) -> str | None:
    """UTF-8 with a few stray bytes (a name cut short, one Latin-1 character pasted in):
    read as UTF-8 with the strays as windows-1252. None when the 8-bit bytes are mostly
    not UTF-8 (another charset, such as GBK, where UTF-8 sequences occur by chance)."""
    sequences = _UTF8_SEQUENCE.findall(data)
    covered = sum(map(len, sequences))
    if len(sequences) < 2 or covered < 0.8 * len(_HIGH.findall(data)):
        return None
    return data.decode("utf-8", "mailbeat-utf8")


# -- ISO-2022-JP as Microsoft writes it (CP50220/CP50221) --------------------------------

_ESCAPE = re.compile(rb"\x1b(\$[@B]|\$\(D|\$\([OQP]|\$A|\$\(C|\([BJIH]|\$\(B)|[\x0e\x0f]")


def decode_iso2022jp(data: bytes) -> tuple[str, bool]:
    """ISO-2022-JP read as Windows reads it (CP50220/CP50221): JIS X 0208 through CP932,
    so NEC's row 13 (①, ㈱), the IBM extensions and the carriers' emoji codes decode; JIS
    X 0212; half-width katakana by ESC ( I, SO/SI or 8-bit bytes. Never fails; clean is
    False when a byte could not be read."""
    out: list[str] = []
    clean = True
    mode = b"(B"
    position = 0
    saved = mode
    for match in _ESCAPE.finditer(data):
        text, ok = _segment(data[position : match.start()], mode)
        out.append(text)
        clean = clean and ok
        token = match.group(0)
        if token == b"\x0e":
            saved, mode = mode, b"(I"
        elif token == b"\x0f":
            mode = saved
        else:
            mode = match.group(1)
        position = match.end()
    text, ok = _segment(data[position:], mode)
    out.append(text)
    return "".join(out), clean and ok


def _segment(chunk: bytes, mode: bytes) -> tuple[str, bool]:
    if not chunk:
        return "", True
    if mode in (b"(B", b"(J", b"(H"):
        return _single(chunk)
    if mode == b"(I":
        return "".join(chr(0xFF61 + b - 0x21) if 0x21 <= b <= 0x5F else chr(b) for b in chunk), True
    lines = chunk.split(b"\n")
    if len(lines) > 1:  # a line break inside a double-byte run: kept, the run goes on
        parts = [_segment(line.rstrip(b"\r"), mode) for line in lines]
        ends = ["\r\n" if line.endswith(b"\r") else "\n" for line in lines[:-1]] + [""]
        return "".join(t + e for (t, _), e in zip(parts, ends, strict=True)), all(
            ok for _, ok in parts
        )
    if len(chunk) % 2:
        text, _ = _segment(chunk[:-1], mode)
        return text + "\ufffd", False
    if mode in (b"$B", b"$@", b"$(B"):
        sjis = bytearray()
        for first, second in zip(chunk[::2], chunk[1::2], strict=True):
            sjis += _jis_to_sjis(first & 0x7F, second & 0x7F)
        text = bytes(sjis).decode("cp932", "replace")
    elif mode == b"$(D":
        euc = bytearray()
        for first, second in zip(chunk[::2], chunk[1::2], strict=True):
            euc += bytes((0x8F, first | 0x80, second | 0x80))
        text = bytes(euc).decode("euc_jp", "replace")
    elif mode == b"$A":
        text = bytes(c | 0x80 for c in chunk).decode("gb18030", "replace")
    elif mode == b"$(C":
        text = bytes(c | 0x80 for c in chunk).decode("cp949", "replace")
    else:  # JIS X 0213 planes
        try:
            return (b"\x1b" + mode + chunk).decode("iso2022_jp_2004"), True
        except UnicodeDecodeError:
            return "\ufffd" * (len(chunk) // 2), False
    return text, "\ufffd" not in text


def _single(chunk: bytes) -> tuple[str, bool]:
    if chunk.isascii():
        return chunk.decode("ascii"), True
    # 8-bit bytes in ISO-2022-JP: half-width katakana (CP50222); any other is a stray,
    # kept as windows-1252 reads it.
    text = "".join(
        chr(0xFF61 + b - 0xA1) if 0xA1 <= b <= 0xDF else bytes((b,)).decode("cp1252", "mailbeat-c1")
        for b in chunk
    )
    return text, all(b < 0x80 or 0xA1 <= b <= 0xDF for b in chunk)


def _jis_to_sjis(first: int, second: int) -> bytes:
    lead = ((first + 1) >> 1) + (0x70 if first <= 0x5E else 0xB0)
    trail = second + (0x1F if second <= 0x5F else 0x20) if first & 1 else second + 0x7E
    return bytes((lead & 0xFF, trail & 0xFF))


# -- text that names no charset ----------------------------------------------------------


def has_iso2022jp(data: bytes) -> bool:
    return b"\x1b" in data and _ISO2022JP.search(data) is not None


def html_meta(data: bytes) -> Encoding | None:
    """The charset an HTML document names in its first bytes (<meta charset> or the
    http-equiv Content-Type); UTF-16 there means UTF-8, as in browsers."""
    found = _META.search(data, 0, 4096)
    if found is None:
        return None
    encoding = lookup(found.group(1).decode("ascii"))
    if encoding is not None and encoding.name.startswith("utf-16"):
        return UTF8
    return encoding


def detect(data: bytes) -> Encoding | None:
    """A guess at the charset of text that names none and is not UTF-8."""
    sample = data[:DETECT_BYTES]
    if len(data) > DETECT_BYTES and (cut := sample.rfind(b"\n")) > 0:
        sample = sample[:cut]
    best = from_bytes(sample).best()
    if best is None:
        return None
    return lookup(best.encoding)
