"""Corpus readers: files, folders, .gz files and JSONL records, as ``Document``s.

Every file is read whole and checked before any point is written, so bad input fails fast and
leaves the store unchanged. A file named on the command line must be readable UTF-8 text; in a
folder, empty files are skipped (``__init__.py`` is often empty) and unreadable ones fail
unless ``skip_invalid`` is set.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from knn_store.errors import CorpusError

_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, or one JSONL record (``source`` = ``path#line``)."""

    source: str
    text: str


@dataclass
class CorpusReport:
    """What reading skipped, for the summary."""

    skipped: list[str] = field(default_factory=list)


def read_corpus(
    paths: Sequence[str | Path],
    *,
    glob: str = "**/*",
    text_field: str = "text",
    skip_invalid: bool = False,
    report: CorpusReport | None = None,
) -> Iterator[Document]:
    """Yield the documents under ``paths`` in a stable order.

    Args:
        paths: files or folders. Folders are walked with ``glob`` (recursive by default),
            leaving out hidden files and folders such as ``.git``.
        glob: pattern for files inside folders, e.g. ``"**/*.py"``.
        text_field: the field holding the text in ``.jsonl`` / ``.jsonl.gz`` records.
        skip_invalid: skip binary, non-UTF-8 and malformed files found in folders instead of
            failing (files named directly always fail).
        report: collects the skipped files.
    """
    if not paths:
        raise CorpusError("no input given; pass files or folders")
    report = report if report is not None else CorpusReport()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            try:
                files = sorted(
                    p for p in path.glob(glob) if p.is_file() and not _hidden(p.relative_to(path))
                )
            except (ValueError, NotImplementedError) as exc:  # '' or an absolute pattern
                raise CorpusError(f"invalid glob {glob!r}: {exc}") from exc
            if not files:
                raise CorpusError(f"folder {path} has no files matching {glob!r}")
            for file in files:
                try:  # a whole file or nothing: a skipped file yields no records
                    docs = list(
                        _read_file(file, text_field=text_field, allow_empty=True, report=report)
                    )
                except CorpusError:
                    if not skip_invalid:
                        raise
                    report.skipped.append(str(file))
                    continue
                yield from docs
        elif path.is_file():
            yield from _read_file(path, text_field=text_field, allow_empty=False, report=report)
        elif path.exists():
            raise CorpusError(f"{path} is neither a file nor a folder")
        else:
            raise CorpusError(f"{path} does not exist")


def _hidden(relative: Path) -> bool:
    """Dotfiles and anything under a dot-folder (.git, .venv) are not corpus text."""
    return any(part.startswith(".") for part in relative.parts)


def _read_file(
    path: Path, *, text_field: str, allow_empty: bool, report: CorpusReport
) -> Iterator[Document]:
    text = _read_text(path)
    if not text.strip():
        if allow_empty:
            report.skipped.append(str(path))
            return
        raise CorpusError(f"{path} is empty")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        yield from _jsonl_records(path, text, text_field=text_field, allow_empty=allow_empty)
    else:
        yield Document(source=str(path), text=text)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {exc}") from exc
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise CorpusError(f"{path} looks binary (it holds NUL bytes); pass text files only")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # drop a byte-order mark
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it with iconv or leave it out"
        ) from exc


def _jsonl_records(
    path: Path, text: str, *, text_field: str, allow_empty: bool
) -> Iterator[Document]:
    found = 0
    # Split on "\n" only: splitlines() also splits on U+2028/U+0085, legal inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(
                f"{path}:{lineno} has no field {text_field!r}; choose it with --text-field"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
        if value.strip():
            found += 1
            yield Document(source=f"{path}#{lineno}", text=value)
    if not found and not allow_empty:
        raise CorpusError(f"{path} has no records with text in field {text_field!r}")
