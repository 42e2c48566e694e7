"""Corpus readers: files, folders, .gz files and JSONL records, as ``Document``s.

Reading streams: one document at a time, JSONL line by line, so memory does not grow with the
corpus. A ``Corpus`` can be read again (the ingest worker checks every document in a first
pass, so bad input fails before any point is written). A file named on the command line must
be readable UTF-8 text; in a folder, empty files are skipped (``__init__.py`` is often empty)
and unreadable ones fail unless ``skip_invalid`` is set, in which case they are left out
whole and named in the report.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from knn_store.errors import CorpusError

_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, or one JSONL record (``source`` = ``path#line``)."""

    source: str
    text: str


@dataclass
class CorpusReport:
    """What reading left out: empty files, and invalid ones with ``skip_invalid``."""

    skipped: list[str] = field(default_factory=list)  # paths, in reading order
    reasons: dict[str, str] = field(default_factory=dict)  # path -> why it was left out


@dataclass
class Corpus:
    """The documents under ``paths``, readable any number of times, each time from disk.

    Args:
        paths: files or folders. Folders are walked with ``glob`` (recursive by default),
            leaving out hidden files and folders such as ``.git``.
        glob: pattern for files inside folders, e.g. ``"**/*.py"``.
        text_field: the field holding the text in ``.jsonl`` / ``.jsonl.gz`` records.
        skip_invalid: skip binary, non-UTF-8 and malformed files found in folders instead of
            failing (files named directly always fail).
    """

    paths: Sequence[str | Path]
    glob: str = "**/*"
    text_field: str = "text"
    skip_invalid: bool = False
    report: CorpusReport = field(default_factory=CorpusReport)

    def __iter__(self) -> Iterator[Document]:
        self.report = CorpusReport()  # each reading reports afresh
        return read_corpus(
            self.paths,
            glob=self.glob,
            text_field=self.text_field,
            skip_invalid=self.skip_invalid,
            report=self.report,
        )


def read_corpus(
    paths: Sequence[str | Path],
    *,
    glob: str = "**/*",
    text_field: str = "text",
    skip_invalid: bool = False,
    report: CorpusReport | None = None,
) -> Iterator[Document]:
    """Yield the documents under ``paths`` in a stable order (see ``Corpus``)."""
    if not paths:
        raise CorpusError("no input given; pass files or folders")
    report = report if report is not None else CorpusReport()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = _list_files(path, glob, skip_invalid=skip_invalid, report=report)
            if not files:
                raise CorpusError(f"folder {path} has no files matching {glob!r}")
            for file in files:
                # A whole file or nothing: a skipped file yields no records. A text file is
                # read whole before its one document is yielded, so a single read decides;
                # only .jsonl records, which stream, are checked through first, and only
                # where a bad file is to be skipped rather than stop the reading.
                if skip_invalid and _is_jsonl(file):
                    try:
                        _check_file(file, text_field=text_field)
                    except CorpusError as exc:
                        report.skipped.append(str(file))
                        report.reasons[str(file)] = str(exc)
                        continue
                try:
                    yield from _read_file(
                        file, text_field=text_field, allow_empty=True, report=report
                    )
                except CorpusError as exc:
                    if not skip_invalid or _is_jsonl(file):
                        raise
                    report.skipped.append(str(file))
                    report.reasons[str(file)] = str(exc)
        elif path.is_file():
            yield from _read_file(path, text_field=text_field, allow_empty=False, report=report)
        elif path.exists():
            raise CorpusError(f"{path} is neither a file nor a folder")
        else:
            raise CorpusError(f"{path} does not exist")


def _list_files(folder: Path, glob: str, *, skip_invalid: bool, report: CorpusReport) -> list[Path]:
    """The files under ``folder`` matching ``glob``, sorted. An entry that cannot even be
    looked at (a link into a folder we may not read) fails like an unreadable file does."""
    files = []
    try:
        for p in folder.glob(glob):
            if _hidden(p.relative_to(folder)):
                continue
            try:
                if p.is_file():
                    files.append(p)
            except OSError as exc:  # is_file() is False only for missing entries
                error = CorpusError(f"cannot read {p}: {exc.strerror or exc}")
                if not skip_invalid:
                    raise error from exc
                report.skipped.append(str(p))
                report.reasons[str(p)] = str(error)
    except (ValueError, NotImplementedError) as exc:  # '' or an absolute pattern
        raise CorpusError(f"invalid glob {glob!r}: {exc}") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
    return sorted(files)


def _hidden(relative: Path) -> bool:
    """Dotfiles and anything under a dot-folder (.git, .venv) are not corpus text."""
    return any(part.startswith(".") for part in relative.parts)


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(".jsonl")


def _check_file(path: Path, *, text_field: str) -> None:
    """Read a file through once, raising ``CorpusError`` at the first problem."""
    for _ in _read_file(path, text_field=text_field, allow_empty=True, report=CorpusReport()):
        pass


def _read_file(
    path: Path, *, text_field: str, allow_empty: bool, report: CorpusReport
) -> Iterator[Document]:
    if _is_jsonl(path):
        yield from _jsonl_records(path, text_field=text_field, allow_empty=allow_empty)
        return
    with _open_text(path) as stream:
        text = _read_all(stream, path).removeprefix("\ufeff")  # drop a byte-order mark
    if "\x00" in text:  # past the sniffed head: the same file must not pass for text
        raise _binary(path)
    if not text.strip():
        if allow_empty:
            report.skipped.append(str(path))
            report.reasons[str(path)] = "empty"
            return
        raise CorpusError(f"{path} is empty")
    yield Document(source=str(path), text=text)


def _open_text(path: Path) -> IO[str]:
    """A strict UTF-8 text stream over a file or a .gz file, after a check for binary data."""
    try:
        # closed by the returned stream, or below
        raw: IO[bytes] = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # noqa: SIM115
        head = raw.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {exc}") from exc
    if b"\x00" in head:
        raw.close()
        raise _binary(path)
    buffered = io.BufferedReader(_Prepend(head, raw))  # type: ignore[arg-type]
    # newline="\n": text comes back exactly as stored ("\r\n" stays), and readline() ends
    # lines at "\n" only; with newline="" it also split at a bare "\r", which JSON allows
    # between tokens, and miscounted the lines after it.
    return io.TextIOWrapper(buffered, encoding="utf-8", errors="strict", newline="\n")


def _binary(path: Path) -> CorpusError:
    return CorpusError(f"{path} looks binary (it holds NUL bytes); pass text files only")


def _read_all(stream: IO[str], path: Path) -> str:
    try:
        return stream.read()
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> CorpusError:
    return CorpusError(
        f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
        "convert it with iconv or leave it out"
    )


def _jsonl_records(path: Path, *, text_field: str, allow_empty: bool) -> Iterator[Document]:
    found = 0
    with _open_text(path) as stream:
        lineno = 0
        while True:
            try:
                line = stream.readline()
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc) from exc
            except (OSError, EOFError, zlib.error) as exc:
                raise CorpusError(f"cannot read {path}: {exc}") from exc
            if not line:
                break
            lineno += 1
            # readline() splits on "\n" only (newline="\n"), never inside a JSON string.
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:80]
                raise CorpusError(f"{path}:{lineno} is not valid JSON: {reason}") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(
                    f"{path}:{lineno} has no field {text_field!r}; choose it with --text-field"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
                raise CorpusError(
                    f"{path}:{lineno}: field {text_field!r} holds an unpaired surrogate"
                ) from exc
            if value.strip():
                found += 1
                yield Document(source=f"{path}#{lineno}", text=value)
    if not found and not allow_empty:
        raise CorpusError(f"{path} has no records with text in field {text_field!r}")


class _Prepend(io.RawIOBase):
    """The sniffed head of a file followed by the rest of it, as one raw stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()


def count_documents(corpus: Corpus) -> int:
    """Read a corpus through once (checking every file) and count its documents; a corpus
    without any is a ``CorpusError``."""
    n = sum(1 for _ in corpus)
    if n == 0:
        raise CorpusError("the corpus holds no documents (every file is empty)")
    return n
