"""The corpus readers fed random and hostile bytes: documents or a ``CorpusError``, nothing else.

Every input is tried as a plain file, ``.gz``, ``.jsonl`` and ``.jsonl.gz``, named directly
and inside a folder next to a good file, with and without ``skip_invalid``. Hypothesis draws
random bytes, text and almost-valid JSON lines (then cuts, flips or pads them); the
hand-written cases below are the known nasty ones.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.corpus import Corpus, CorpusReport, Document, read_corpus
from knn_store.errors import CorpusError
from tests.files import write as _write

KINDS = ("txt", "gz", "jsonl", "jsonl.gz")
GOOD_TEXT = "a good document that always reads\n"

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(kind: str, data: bytes, *, compress: bool) -> bytes:
    """The file's bytes: ``data`` gzipped for .gz kinds when ``compress`` (else raw bytes in a
    file that claims to be gzip)."""
    return gzip.compress(data, mtime=0) if kind.endswith("gz") and compress else data


def _read(
    root: Path, kind: str, content: bytes, *, in_folder: bool, skip_invalid: bool, field: str
) -> tuple[list[Document] | CorpusError, CorpusReport, Path]:
    """Write ``content`` as ``bad.<kind>`` (in a folder next to a good file, or alone) and
    read it; whatever is raised other than a CorpusError escapes and fails the test."""
    folder = root / "corpus"
    bad = _write(folder / f"bad.{kind}", content)
    corpus = Corpus([folder if in_folder else bad], text_field=field, skip_invalid=skip_invalid)
    if in_folder:
        _write(folder / "good.txt", GOOD_TEXT)
    try:
        return list(corpus), corpus.report, bad
    except CorpusError as exc:
        assert str(exc).strip() and "\n" not in str(exc)  # one line for the CLI
        return exc, corpus.report, bad


def _check(
    outcome: list[Document] | CorpusError,
    report: CorpusReport,
    bad: Path,
    *,
    in_folder: bool,
    skip_invalid: bool,
) -> None:
    if isinstance(outcome, CorpusError):
        # With skip_invalid, a bad file in a folder is left out, never fatal.
        assert not (in_folder and skip_invalid), outcome
        return
    for doc in outcome:
        assert isinstance(doc, Document) and isinstance(doc.text, str)
        assert doc.text.strip()
        doc.text.encode("utf-8")  # no lone surrogate reaches the tokenizer
        if not bad.name.startswith("bad.jsonl"):
            assert "\x00" not in doc.text  # a plain file with NUL bytes is binary
    if in_folder:
        assert Document(str(bad.parent / "good.txt"), GOOD_TEXT) in outcome
        from_bad = [d for d in outcome if d.source.split("#")[0] == str(bad)]
        assert not (from_bad and str(bad) in report.skipped)  # a file whole, or not at all


# --- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@st.composite
def jsonl_bytes(draw: st.DrawFn) -> bytes:
    """Lines of JSON records, most with a "text" field, in various encodings and endings."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        record = draw(st.dictionaries(st.sampled_from(["text", "body", "x"]), json_values))
        if draw(st.booleans()):
            record["text"] = draw(st.text(max_size=30))
        value = record if draw(st.integers(0, 9)) else draw(json_values)
        lines.append(json.dumps(value, ensure_ascii=draw(st.booleans())))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r", "\n\n"]))
    return ending.join(lines).encode("utf-8", "surrogatepass")


@st.composite
def damaged(draw: st.DrawFn, inner: st.SearchStrategy[bytes]) -> bytes:
    """``inner``'s bytes, perhaps cut short, with a byte flipped, or with bytes spliced in."""
    data = draw(inner)
    how = draw(st.sampled_from(["as is", "cut", "flip", "splice"]))
    if how == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        noise = draw(st.sampled_from([b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"\xed\xa0\x80"]))
        data = data[:i] + noise + data[i:]
    return data


contents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    jsonl_bytes(),
)


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    content=st.one_of(contents, damaged(contents)),
    compress=st.booleans(),
    compressed_damage=st.sampled_from(["none", "cut", "trailing"]),
    in_folder=st.booleans(),
    skip_invalid=st.booleans(),
    field=st.sampled_from(["text", "body"]),
)
def test_random_bytes_give_documents_or_a_corpus_error(
    kind: str,
    content: bytes,
    compress: bool,
    compressed_damage: str,
    in_folder: bool,
    skip_invalid: bool,
    field: str,
) -> None:
    data = _encode(kind, content, compress=compress)
    if kind.endswith("gz") and compress and compressed_damage == "cut":
        data = data[: len(data) // 2]
    elif kind.endswith("gz") and compress and compressed_damage == "trailing":
        data += b"garbage after the gzip member"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outcome, report, bad = _read(
            root, kind, data, in_folder=in_folder, skip_invalid=skip_invalid, field=field
        )
        _check(outcome, report, bad, in_folder=in_folder, skip_invalid=skip_invalid)
        # A corpus read twice (the ingest's two passes) reads the same both times.
        again, _, _ = _read(
            root / "again", kind, data, in_folder=in_folder, skip_invalid=skip_invalid, field=field
        )
        if isinstance(outcome, CorpusError):
            assert isinstance(again, CorpusError)
        else:
            assert not isinstance(again, CorpusError)
            assert [d.text for d in again] == [d.text for d in outcome]


@settings(FUZZ, max_examples=60)
@given(content=contents, field=st.sampled_from(["text", "body"]))
def test_skip_invalid_never_excuses_a_file_named_directly(content: bytes, field: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in KINDS:
            data = _encode(kind, content, compress=True)
            strict, _, _ = _read(
                root / kind / "a", kind, data, in_folder=False, skip_invalid=False, field=field
            )
            lenient, _, _ = _read(
                root / kind / "b", kind, data, in_folder=False, skip_invalid=True, field=field
            )
            assert isinstance(strict, CorpusError) == isinstance(lenient, CorpusError)


# --- the known nasty inputs ------------------------------------------------------------------

TEXT = ("some ordinary text, long enough to compress well. " * 40).encode()
RECORD = b'{"text": "a record"}\n'


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


NASTY: list[tuple[str, str, bytes, str | None]] = [
    # (id, kind, bytes, the one text it must read as, or None for a CorpusError)
    ("truncated gzip", "gz", _gz(TEXT)[:-12], None),
    ("truncated gzip header", "gz", _gz(TEXT)[:6], None),
    ("truncated gzip jsonl", "jsonl.gz", _gz(RECORD * 50)[:-9], None),
    ("gzip then garbage", "gz", _gz(TEXT) + b"not gzip", None),
    ("two gzip members", "gz", _gz(b"first ") + _gz(b"second"), "first second"),
    ("empty .gz file", "gz", b"", None),
    ("plain text named .gz", "gz", TEXT, None),
    ("gzip of binary", "gz", _gz(b"\x7fELF\x00\x01"), None),
    ("utf-8 BOM", "txt", b"\xef\xbb\xbfhello", "hello"),
    ("BOM only", "txt", b"\xef\xbb\xbf", None),
    ("utf-16 with BOM", "txt", "hello".encode("utf-16"), None),
    ("utf-32", "txt", "hello".encode("utf-32"), None),
    ("BOM before the first record", "jsonl", b"\xef\xbb\xbf" + RECORD, "a record"),
    ("BOM before a later record", "jsonl", RECORD + b"\xef\xbb\xbf" + RECORD, None),
    ("lone high surrogate escape", "jsonl", b'{"text": "\\ud800"}\n', None),
    ("lone low surrogate escape", "jsonl", b'{"text": "ab\\udc00cd"}\n', None),
    ("surrogate pair escape", "jsonl", b'{"text": "\\ud83d\\ude00"}\n', "\U0001f600"),
    ("surrogate in another field", "jsonl", b'{"text": "ok", "x": "\\ud800"}\n', "ok"),
    ("encoded surrogate bytes", "txt", b"ab\xed\xa0\x80cd", None),
    ("huge integer text", "jsonl", b'{"text": 1' + b"0" * 5000 + b"}\n", None),
    ("huge integer elsewhere", "jsonl", b'{"text": "ok", "n": 1' + b"0" * 5000 + b"}\n", None),
    ("float overflow", "jsonl", b'{"text": 1e999}\n', None),
    ("NaN text", "jsonl", b'{"text": NaN}\n', None),
    ("deeply nested array", "jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", None),
    (
        "deeply nested field",
        "jsonl",
        b'{"text": "ok", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        None,
    ),
    ("NUL early", "txt", b"ab\x00cd", None),
    ("NUL past the sniffed head", "txt", b"a" * 10_000 + b"\x00b", None),
    ("NUL past the head, gzipped", "gz", _gz(b"a" * 10_000 + b"\x00b"), None),
    ("raw NUL in a late record", "jsonl", RECORD * 600 + b'{"text": "a\x00b"}\n', None),
    ("escaped NUL in a record", "jsonl", b'{"text": "a\\u0000b"}\n', "a\x00b"),
    ("invalid utf-8 past the head", "txt", b"a" * 10_000 + b"\xff", None),
    ("bare CR between JSON tokens", "jsonl", b'{"text":\r"abc"}\n', "abc"),
    ("CRLF records", "jsonl", b'{"text": "a"}\r\n{"text": "b"}\r\n', "a"),
    ("record that is a list", "jsonl", b'["text"]\n', None),
    ("record that is a string", "jsonl", b'"text"\n', None),
    ("only blank lines", "jsonl", b"\n\r\n  \n", None),
    ("whitespace text", "txt", b" \t\r\n\x0b\x0c", None),
]


@pytest.mark.parametrize(
    ("kind", "content", "expected"),
    [pytest.param(kind, content, expected, id=name) for name, kind, content, expected in NASTY],
)
def test_nasty_input_named_directly(
    tmp_path: Path, kind: str, content: bytes, expected: str | None
) -> None:
    outcome, _, _ = _read(
        tmp_path, kind, content, in_folder=False, skip_invalid=False, field="text"
    )
    if expected is None:
        assert isinstance(outcome, CorpusError), outcome
    else:
        assert not isinstance(outcome, CorpusError), outcome
        assert outcome[0].text == expected


@pytest.mark.parametrize(
    ("kind", "content"), [pytest.param(k, c, id=name) for name, k, c, _ in NASTY]
)
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_nasty_input_in_a_folder(
    tmp_path: Path, kind: str, content: bytes, skip_invalid: bool
) -> None:
    outcome, report, bad = _read(
        tmp_path, kind, content, in_folder=True, skip_invalid=skip_invalid, field="text"
    )
    _check(outcome, report, bad, in_folder=True, skip_invalid=skip_invalid)
    if skip_invalid and isinstance(outcome, list) and str(bad) in report.skipped:
        assert str(bad) in report.reasons  # a skipped file is named with its reason


def test_a_bad_record_after_a_bare_cr_is_named_by_its_real_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", b'{"text":\r"a"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"x\.jsonl:2"):
        list(read_corpus([path]))


def _unreadable_link(folder: Path) -> Path:
    """A link whose target even root may not look at (another namespace's /proc entry)."""
    target = Path("/proc/1/cwd")
    try:
        os.stat(target)
    except PermissionError:
        pass
    except OSError as exc:
        pytest.skip(f"cannot make an unreadable entry here: {exc}")
    else:
        pytest.skip("/proc/1/cwd is readable here, so no entry refuses to be looked at")
    link = folder / "link"
    os.symlink(target, link)
    return link


def test_an_entry_that_cannot_be_looked_at_fails_or_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "good.txt", GOOD_TEXT)
    link = _unreadable_link(tmp_path)
    with pytest.raises(CorpusError, match=r"cannot read .*link"):
        list(read_corpus([tmp_path]))
    corpus = Corpus([tmp_path], skip_invalid=True)
    assert [d.text for d in corpus] == [GOOD_TEXT]
    assert corpus.report.skipped == [str(link)]
    assert "Permission denied" in corpus.report.reasons[str(link)]
