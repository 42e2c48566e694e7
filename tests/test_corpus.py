"""read_corpus: files, folders, .gz and JSONL input, and the errors bad input must raise."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ingest.corpus import CorpusReport, Document, read_corpus
from knn_store.errors import CorpusError, KnnlmError
from tests.files import write as _write


def _jsonl(*records: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder with text files at two depths, a non-.txt file and an empty file."""
    root = tmp_path / "tree"
    _write(root / "b.txt", "bravo\n")
    _write(root / "a.txt", "alpha\n")
    _write(root / "notes.md", "# markdown\n")
    _write(root / "sub" / "c.txt", "charlie\n")
    _write(root / "sub" / "deeper" / "d.txt", "delta\n")
    _write(root / "zero.txt", "")
    return root


# --- plain files and folders ------------------------------------------------------------------


def test_plain_file_is_one_document_with_its_exact_text(tmp_path: Path) -> None:
    text = "def f(x):\n    return x  # café ✓\n"
    path = _write(tmp_path / "code.py", text)
    assert list(read_corpus([path])) == [Document(source=str(path), text=text)]


def test_paths_may_be_strings_and_keep_their_given_order(tmp_path: Path) -> None:
    second = _write(tmp_path / "a.txt", "second\n")
    first = _write(tmp_path / "z.txt", "first\n")
    docs = list(read_corpus([str(first), str(second)]))
    assert [d.text for d in docs] == ["first\n", "second\n"]


def test_folder_default_glob_is_recursive_and_sorted(tree: Path) -> None:
    report = CorpusReport()
    docs = list(read_corpus([tree], report=report))
    expected = ["a.txt", "b.txt", "notes.md", "sub/c.txt", "sub/deeper/d.txt"]
    assert [d.source for d in docs] == [str(tree / name) for name in expected]
    assert [d.text for d in docs] == ["alpha\n", "bravo\n", "# markdown\n", "charlie\n", "delta\n"]
    assert report.skipped == [str(tree / "zero.txt")]


def test_star_glob_stays_at_the_top_level(tree: Path) -> None:
    docs = list(read_corpus([tree], glob="*.txt"))
    assert [d.source for d in docs] == [str(tree / "a.txt"), str(tree / "b.txt")]


def test_double_star_glob_recurses_but_filters_by_suffix(tree: Path) -> None:
    docs = list(read_corpus([tree], glob="**/*.txt"))
    expected = ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert [d.source for d in docs] == [str(tree / name) for name in expected]


def test_folder_order_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ["m.txt", "c.txt", "x.txt", "a.txt"]:
        _write(one / name, name)
    for name in ["a.txt", "x.txt", "c.txt", "m.txt"]:
        _write(two / name, name)
    texts_one = [d.text for d in read_corpus([one])]
    texts_two = [d.text for d in read_corpus([two])]
    assert texts_one == texts_two == ["a.txt", "c.txt", "m.txt", "x.txt"]
    assert [d.text for d in read_corpus([one])] == texts_one  # and again, identically


def test_files_and_folders_mix(tree: Path, tmp_path: Path) -> None:
    single = _write(tmp_path / "single.txt", "single\n")
    docs = list(read_corpus([single, tree / "sub"]))
    assert [d.text for d in docs] == ["single\n", "charlie\n", "delta\n"]


def test_crlf_and_unicode_text_survive_unchanged(tmp_path: Path) -> None:
    raw = "línea uno\r\nzweite Zeile\r\n日本語\r\n"
    path = _write(tmp_path / "crlf.txt", raw.encode("utf-8"))
    assert [d.text for d in read_corpus([path])] == [raw]


def test_utf8_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello\n")
    assert [d.text for d in read_corpus([path])] == ["hello\n"]


# --- .gz and JSONL ----------------------------------------------------------------------------


def test_gz_file_is_decompressed(tmp_path: Path) -> None:
    text = "compressed text\nsecond line\n"
    path = _write(tmp_path / "doc.txt.gz", gzip.compress(text.encode()))
    assert list(read_corpus([path])) == [Document(source=str(path), text=text)]


def test_jsonl_records_with_named_field_and_line_sources(tmp_path: Path) -> None:
    body = (
        json.dumps({"body": "first record", "id": 1})
        + "\n\n   \n"  # blank and whitespace-only lines are ignored, but still counted
        + json.dumps({"body": "second record", "id": 2})
        + "\n"
    )
    path = _write(tmp_path / "data.jsonl", body)
    docs = list(read_corpus([path], text_field="body"))
    assert docs == [
        Document(source=f"{path}#1", text="first record"),
        Document(source=f"{path}#4", text="second record"),
    ]


def test_jsonl_gz_records(tmp_path: Path) -> None:
    body = _jsonl({"content": "one"}, {"content": "two"}, {"content": "three"})
    path = _write(tmp_path / "data.jsonl.gz", gzip.compress(body.encode()))
    docs = list(read_corpus([path], text_field="content"))
    assert [(d.source, d.text) for d in docs] == [
        (f"{path}#1", "one"),
        (f"{path}#2", "two"),
        (f"{path}#3", "three"),
    ]


def test_jsonl_default_field_is_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "hello"}))
    assert [d.text for d in read_corpus([path])] == ["hello"]


def test_jsonl_records_with_blank_text_are_left_out(tmp_path: Path) -> None:
    body = _jsonl({"text": "kept"}, {"text": "  \n"}, {"text": "also"})
    path = _write(tmp_path / "d.jsonl", body)
    assert [d.source for d in read_corpus([path])] == [f"{path}#1", f"{path}#3"]


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 raw: they are not line breaks.
    text = "para one\u2028para two\x85end"
    path = _write(tmp_path / "sep.jsonl", _jsonl({"text": text}, {"text": "next"}))
    docs = list(read_corpus([path]))
    assert [(d.source, d.text) for d in docs] == [(f"{path}#1", text), (f"{path}#2", "next")]


def test_jsonl_with_crlf_line_endings(tmp_path: Path) -> None:
    path = _write(tmp_path / "crlf.jsonl", b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [d.text for d in read_corpus([path])] == ["a", "b"]


def test_plain_txt_is_not_parsed_as_json(tmp_path: Path) -> None:
    raw = '{"text": "looks like json"}\n'
    path = _write(tmp_path / "d.txt", raw)
    assert [d.text for d in read_corpus([path])] == [raw]


# --- errors for files named directly ----------------------------------------------------------


def _corpus_error(paths: list[str | Path], **kwargs: object) -> str:
    with pytest.raises(CorpusError) as info:
        list(read_corpus(paths, **kwargs))  # type: ignore[arg-type]
    assert isinstance(info.value, KnnlmError)
    return str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    message = _corpus_error([missing])
    assert str(missing) in message
    assert "does not exist" in message


def test_empty_file_named_directly(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.txt", "")
    message = _corpus_error([path])
    assert str(path) in message
    assert "empty" in message


def test_whitespace_only_file_named_directly_counts_as_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "blank.txt", " \n\t\n")
    assert str(path) in _corpus_error([path])


def test_binary_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "blob.txt", b"ELF\x00\x01\x02binary")
    message = _corpus_error([path])
    assert str(path) in message
    assert "binary" in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin1.txt", b"caf\xe9\n")
    message = _corpus_error([path])
    assert str(path) in message
    assert "UTF-8" in message
    assert "0xe9" in message


def test_binary_content_inside_gz(tmp_path: Path) -> None:
    path = _write(tmp_path / "blob.txt.gz", gzip.compress(b"\x00\x01\x02"))
    assert str(path) in _corpus_error([path])


def test_gz_that_is_not_gzip(tmp_path: Path) -> None:
    path = _write(tmp_path / "fake.txt.gz", b"plain text, not gzip\n")
    message = _corpus_error([path])
    assert str(path) in message
    assert "cannot read" in message


def test_truncated_gz(tmp_path: Path) -> None:
    whole = gzip.compress(b"some text that will be cut short " * 20)
    path = _write(tmp_path / "cut.txt.gz", whole[: len(whole) // 2])
    assert str(path) in _corpus_error([path])


def test_corrupt_gz_body(tmp_path: Path) -> None:
    whole = gzip.compress(b"hello world " * 50)
    body = bytes(b ^ 0x55 for b in whole[10:-8])  # valid header, garbled deflate stream
    path = _write(tmp_path / "garbled.txt.gz", whole[:10] + body + whole[-8:])
    assert str(path) in _corpus_error([path])


def test_malformed_json_line_names_path_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": oops}\n')
    message = _corpus_error([path])
    assert f"{path}:3" in message
    assert "JSON" in message


def test_jsonl_record_without_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "a"}, {"body": "b"}))
    message = _corpus_error([path])
    assert f"{path}:2" in message
    assert "'text'" in message
    assert "--text-field" in message


def test_jsonl_field_name_is_the_one_asked_for(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "a"}))
    message = _corpus_error([path], text_field="body")
    assert f"{path}:1" in message
    assert "'body'" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '["text", "a list"]\n')
    assert f"{path}:1" in _corpus_error([path])


def test_jsonl_field_that_is_not_a_string(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "ok"}, {"text": 42}))
    message = _corpus_error([path])
    assert f"{path}:2" in message
    assert "not a string" in message


def test_jsonl_with_no_text_at_all(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": ""}, {"text": "   "}))
    assert str(path) in _corpus_error([path])


def test_folder_without_matching_files(tree: Path) -> None:
    message = _corpus_error([tree], glob="**/*.rst")
    assert str(tree) in message
    assert "'**/*.rst'" in message


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "void"
    folder.mkdir()
    assert str(folder) in _corpus_error([folder])


@pytest.mark.parametrize("pattern", ["", "/abs/*.txt"])
def test_invalid_glob_is_a_corpus_error(tree: Path, pattern: str) -> None:
    assert repr(pattern) in _corpus_error([tree], glob=pattern)


def test_empty_paths_list() -> None:
    assert "no input" in _corpus_error([])


def test_error_comes_before_any_later_path_is_read(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.txt", "good\n")
    reader = read_corpus([good, tmp_path / "missing.txt"])
    assert next(reader).text == "good\n"
    with pytest.raises(CorpusError, match=r"missing\.txt"):
        next(reader)


# --- errors and skips inside folders ----------------------------------------------------------


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Good files, empty files, and one binary, one non-UTF-8 and one malformed JSONL file."""
    root = tmp_path / "mixed"
    _write(root / "a_good.txt", "good a\n")
    _write(root / "b_empty.txt", "")
    _write(root / "c_binary.dat", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    _write(root / "d_latin1.txt", b"na\xefve\n")
    _write(root / "e_bad.jsonl", '{"text": "first record is fine"}\n{broken\n')
    _write(root / "f_blank.txt", "   \n\n")
    _write(root / "g_good.jsonl", _jsonl({"text": "good g"}))
    return root


def test_empty_files_in_a_folder_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "a.txt", "a\n")
    _write(root / "b.txt", "")
    _write(root / "c.txt", "\n  \n")
    _write(root / "d.txt", "d\n")
    report = CorpusReport()
    docs = list(read_corpus([root], report=report))
    assert [d.text for d in docs] == ["a\n", "d\n"]
    assert report.skipped == [str(root / "b.txt"), str(root / "c.txt")]


def test_folder_of_only_empty_files_yields_nothing(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "a.txt", "")
    _write(root / "b.txt", " \n")
    report = CorpusReport()
    assert list(read_corpus([root], report=report)) == []
    assert len(report.skipped) == 2


@pytest.mark.parametrize(
    ("name", "data"),
    [("blob.bin", b"abc\x00def"), ("latin1.txt", b"caf\xe9"), ("bad.jsonl", "{nope\n")],
)
def test_invalid_file_in_a_folder_fails_by_default(
    tmp_path: Path, name: str, data: str | bytes
) -> None:
    root = tmp_path / "r"
    _write(root / "a_ok.txt", "fine\n")
    bad = _write(root / name, data)
    assert str(bad) in _corpus_error([root])


def test_skip_invalid_skips_and_reports_bad_files(mixed: Path) -> None:
    report = CorpusReport()
    docs = list(read_corpus([mixed], skip_invalid=True, report=report))
    assert [d.text for d in docs] == ["good a\n", "good g"]
    assert report.skipped == [
        str(mixed / name)
        for name in ["b_empty.txt", "c_binary.dat", "d_latin1.txt", "e_bad.jsonl", "f_blank.txt"]
    ]


def test_skipped_jsonl_contributes_no_records(mixed: Path) -> None:
    # e_bad.jsonl's first line is valid: a skipped file must not be half-read.
    docs = list(read_corpus([mixed], skip_invalid=True))
    assert not any(d.source.startswith(str(mixed / "e_bad.jsonl")) for d in docs)


def test_skip_invalid_does_not_excuse_files_named_directly(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin1.txt", b"caf\xe9")
    assert str(path) in _corpus_error([path], skip_invalid=True)
    empty = _write(tmp_path / "empty.txt", "")
    assert str(empty) in _corpus_error([empty], skip_invalid=True)


def test_without_a_report_argument_skipping_still_works(mixed: Path) -> None:
    assert len(list(read_corpus([mixed], skip_invalid=True))) == 2


def test_hidden_files_and_folders_are_left_out(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / "a.txt").write_text("kept\n")
    assert [Path(d.source).name for d in read_corpus([tmp_path])] == ["a.txt"]
