"""Hypothesis strategies for hostile requests: form fields, options JSON, multipart
framing and query parameters. Used by the unit fuzzers (no server) and by
tests/e2e/test_request_fuzz.py (over HTTP to a real server).

Nothing here builds a valid program: every upload is garbage bytes, so a request
that gets past the form checks is refused by the upload gate and never queued.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from hypothesis import strategies as st

KNOWN_FIELDS = ("model_name", "backend_id", "device", "options", "verify", "rtol", "atol")
RFC_BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
NOT_A_ZIP = b"this is not a pt2 archive"

# Text that HTTP clients can send: no lone surrogates (they cannot be UTF-8 encoded).
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)

# ---------------------------------------------------------------- numbers as text

# Lengths around the limits that matter (int64, int-to-str's 4300 digits), not only random.
huge_digits = st.one_of(st.sampled_from([19, 20, 21, 40, 4_299, 4_300, 4_301, 4_500]),
                        st.integers(19, 4_500)).map(lambda n: "9" * n)
_EDGES = [2**31, 2**32, 2**53, 2**63, 2**64]
number_text = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(_EDGES).flatmap(lambda e: st.integers(e - 3, e + 3)).map(str),
    st.sampled_from(_EDGES).flatmap(lambda e: st.integers(-e - 3, -e + 3)).map(str),
    huge_digits,
    huge_digits.map(lambda s: "-" + s),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999",
                     "1e-999", "-0", "0x10", "1_000", "\u00b2", "\u0663", " 1", "1 ", "+1",
                     "1.5", "1e3", "9223372036854775807", "9223372036854775808",
                     "-9223372036854775809", "18446744073709551616"]),
    any_text,
)

# ---------------------------------------------------------------- options JSON


def _nest(depth: int, open_: str, close: str, core: str = "1") -> str:
    return open_ * depth + core + close * depth


# Depths around Python's recursion limit and the options size cap, and any other.
depths = st.one_of(st.sampled_from([2, 8, 9, 500, 999, 1_000, 1_001, 2_000, 4_000, 30_000]),
                   st.integers(1, 40_000))


scalar_json = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    any_text,
).map(json.dumps)

options_json = st.one_of(
    # Plausible objects, valid keys or not.
    st.dictionaries(st.one_of(st.sampled_from(["cpp.march", "cpp.simdlen", "freezing",
                                                "max_autotune", "evil"]), any_text),
                    st.one_of(st.booleans(), st.integers(), any_text, st.none()),
                    max_size=6).map(json.dumps),
    # Deep nesting, of every size around the recursion limit and the size cap.
    depths.map(lambda d: _nest(d, "[", "]")),
    depths.map(lambda d: '{"freezing": ' + _nest(d, "[", "]") + "}"),
    depths.map(lambda d: '{"a": ' * d + "1" + "}" * d),
    depths.map(lambda d: "[" * d),  # unclosed
    # Huge and odd numbers.
    huge_digits.map(lambda s: '{"cpp.simdlen": ' + s + "}"),
    huge_digits.map(lambda s: '{"cpp.simdlen": 1.' + s + "}"),
    huge_digits.map(lambda s: '{"cpp.simdlen": 1e' + s + "}"),
    huge_digits,
    st.sampled_from(["NaN", "Infinity", "-Infinity", '{"cpp.simdlen": NaN}',
                     '{"freezing": Infinity}', '{"cpp.simdlen": 1e999}',
                     '{"freezing": true, "freezing": false}', '{"\\ud800": 1}',
                     '{"cpp.march": "\\u0000"}', "[]", "null", "true", '"x"', "{", "}", ""]),
    # Valid JSON that is not an object.
    scalar_json,
    st.lists(scalar_json, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"),
    any_text,
)

# ---------------------------------------------------------------- form fields

field_values: dict[str, st.SearchStrategy[str]] = {
    "model_name": st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
                            any_text, st.integers(0, 5_000).map(lambda n: "a" * n)),
    "backend_id": st.one_of(st.just("aoti"), any_text, st.integers(0, 500).map(lambda n: "b" * n)),
    "device": st.one_of(st.sampled_from(["cpu", "CPU ", "cuda", "cuda:0", "cuda:99", "cuda:-1",
                                         "cuda:" + "9" * 5000, "tpu", "", "cuda:\u0663"]),
                        any_text),
    "options": options_json,
    "verify": st.one_of(st.sampled_from(["true", "false", "1", "0", "yes", "", "maybe", "TRUE"]),
                        any_text),
    "rtol": number_text,
    "atol": number_text,
}
valid_fields: dict[str, st.SearchStrategy[str]] = {
    "model_name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    "backend_id": st.just("aoti"),
    "device": st.just("cpu"),
    "options": st.sampled_from(["{}", '{"freezing": true}', '{"cpp.simdlen": 256}']),
    "verify": st.sampled_from(["true", "false"]),
    "rtol": st.sampled_from(["0.001", "0"]),
    "atol": st.sampled_from(["1e-5", "1"]),
}


@st.composite
def _one_hostile_field(draw: st.DrawFn) -> dict[str, str]:
    """Every other field valid (or absent), so the hostile one is the one parsed."""
    # options is the one field with a grammar of its own, so it is picked most.
    target = draw(st.sampled_from([*field_values, "options", "options"]))
    fields = {"model_name": draw(valid_fields["model_name"])}
    for key in draw(st.lists(st.sampled_from(list(valid_fields)), max_size=4)):
        fields[key] = draw(valid_fields[key])
    fields[target] = draw(field_values[target])
    return fields


form_fields = st.one_of(
    _one_hostile_field(),
    st.fixed_dictionaries({}, optional={**field_values, "colour": any_text, "": any_text}),
)

# ---------------------------------------------------------------- multipart framing


@dataclass
class RawMultipart:
    """A hand-framed body and the Content-Type header that goes with it."""

    content_type: bytes
    body: bytes

    def __repr__(self) -> str:  # keep failure reports readable
        return f"RawMultipart(content_type={self.content_type[:120]!r}, body={self.body[:400]!r}"\
               f"{'...' if len(self.body) > 400 else ''} ({len(self.body)} bytes))"


boundaries = st.one_of(
    st.text(st.sampled_from(RFC_BCHARS), min_size=1, max_size=70),
    st.integers(0, 400).map(lambda n: "b" * n),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_characters='";\\'),
            min_size=0, max_size=300),
)


def _disposition(name: str | None, filename: str | None) -> bytes:
    if name is None:
        return b""
    value = f'form-data; name="{name}"'
    if filename is not None:
        value += f'; filename="{filename}"'
    return b"Content-Disposition: " + value.encode("utf-8", "replace") + b"\r\n"


part_names = st.one_of(st.sampled_from([*KNOWN_FIELDS, "program", "", "other"]), printable)
odd_header_lines = st.lists(st.one_of(
    st.sampled_from([b"X-A: b", b"NoColon", b": empty-name", b"Content-Type: text/plain",
                     b"Content-Disposition: attachment; name=\"x\"",
                     b"Content-Disposition: form-data; name*=utf-8''model_name",
                     b"Content-Disposition: form-data; NAME=\"model_name\"",
                     b"Content-Disposition: form-data; name=model_name; name=device",
                     b"Content-Transfer-Encoding: base64", b"\xff\xfe: \x00\x01",
                     b"X-Long: " + b"v" * 5_000]),
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
), max_size=12)


@st.composite
def multipart_part(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "file", "odd", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    name = draw(st.one_of(st.none(), part_names))
    filename = draw(st.one_of(st.none(), printable)) if kind == "file" else None
    headers = _disposition(name, filename)
    if kind == "odd":
        headers = b"".join(line + b"\r\n" for line in draw(odd_header_lines)) + (
            headers if draw(st.booleans()) else b"")
    if kind == "file" or name == "program":
        payload = draw(st.one_of(st.just(NOT_A_ZIP), st.binary(max_size=200)))
        if payload.startswith(b"PK"):
            payload = b"x" + payload
    else:
        payload = draw(st.one_of(
            st.sampled_from(list(field_values)).flatmap(lambda k: field_values[k]),
            any_text)).encode("utf-8", "replace")
    return headers + b"\r\n" + payload


@st.composite
def multipart_bodies(draw: st.DrawFn) -> RawMultipart:
    boundary = draw(boundaries)
    framing = boundary
    if draw(st.integers(0, 9)) == 0:  # a body framed with another boundary than declared
        framing = draw(boundaries)
    parts = draw(st.lists(multipart_part(), max_size=6))
    if draw(st.booleans()):  # usually carry a name and a program, so deeper code is reached
        parts = [_disposition("model_name", None) + b"\r\nm",
                 _disposition("program", "p.pt2") + b"\r\n" + NOT_A_ZIP, *parts]
        parts = draw(st.permutations(parts))
    delim = b"--" + framing.encode("latin-1", "replace")
    body = draw(st.sampled_from([b"", b"preamble\r\n"]))
    body += b"".join(delim + b"\r\n" + part + b"\r\n" for part in parts)
    ending = draw(st.sampled_from(["close", "close-no-crlf", "none", "close-epilogue"]))
    if ending.startswith("close"):
        body += delim + b"--"
        body += {"close": b"\r\n", "close-no-crlf": b"", "close-epilogue": b"\r\nepilogue"}[
            ending]
    if draw(st.integers(0, 4)) == 0 and body:  # truncated mid-way
        body = body[: draw(st.integers(0, len(body) - 1))]
    quoted = draw(st.booleans())
    param = f'"{boundary}"' if quoted else boundary
    ctype = draw(st.sampled_from([
        "multipart/form-data; boundary={}", "Multipart/Form-Data; BOUNDARY={}",
        "multipart/form-data; charset=utf-8; boundary={}", "multipart/form-data;boundary={}",
        "multipart/form-data; boundary={}; boundary=other", "multipart/mixed; boundary={}",
        "multipart/form-data", "multipart/form-data; boundary=", "text/plain",
    ])).format(param).rstrip(" \t")  # HTTP header values cannot end in whitespace
    return RawMultipart(ctype.encode("latin-1", "replace"), body)


# ---------------------------------------------------------------- query parameters

status_values = st.one_of(
    st.sampled_from(["queued", "running", "succeeded", "failed", "cancelled", "done", "",
                     "QUEUED"]),
    any_text)
list_queries = st.fixed_dictionaries({}, optional={
    "limit": number_text, "cursor": number_text, "status": status_values,
    "model_name": st.one_of(any_text, st.integers(0, 4_000).map(lambda n: "m" * n)),
    "unknown": any_text,
})
submit_queries = st.fixed_dictionaries({}, optional={
    "wait": number_text, "cache": st.one_of(st.sampled_from(["use", "bypass", "USE", ""]),
                                            any_text),
})
job_ids = st.one_of(
    st.text(st.sampled_from("0123456789abcdef"), min_size=32, max_size=32),
    any_text.filter(lambda s: s not in ("", ".", "..")),
    st.integers(60, 6_000).map(lambda n: "f" * n),
    st.sampled_from(["\x00", "a\x00b", "%", "%00", "../x", "nope", " "]),
)
