"""The import rules between knnlm's layers, checked on the source (every import, the lazy
ones inside functions included).

From the bottom up:

- core: the pure math and the error types (``knn``, ``lambdas``, ``gate``, ``windows``,
  ``doc_cache``, ``errors``); they import no other part of knnlm;
- store: ``knn_store.store.*``, the Qdrant engines; core only;
- settings: ``knn_store.settings``, every knob; core and the store's plain types;
- model: the LM, the kNN-LM and what is built on them (``lm``, ``knn_lm``, ``pointers``,
  ``saved_policy``, ``tuning``, ``explain``, ``generation``, ``summary``);
- session: ``knn_store.session`` and the package's front door ``knn_store``;
- ingest: the write side (``ingest``);
- service: the HTTP service (``knnlm.service``);
- cli: the ``knnlm`` command (the rest of ``knnlm``), which runs both.

The query side (``knn_store``, ``knnlm.service``) never imports the write side (``ingest``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["core", "store", "settings", "model", "session", "ingest", "service", "cli"]
LAYER_OF = {
    "knn_store.errors": "core",
    "knn_store.knn": "core",
    "knn_store.lambdas": "core",
    "knn_store.gate": "core",
    "knn_store.windows": "core",
    "knn_store.progress": "core",
    "knn_store.results": "core",
    "knn_store.doc_cache": "core",
    "knn_store.store": "store",
    "knn_store.settings": "settings",
    "knn_store.lm": "model",
    "knn_store.knn_lm": "model",
    "knn_store.saved_policy": "model",
    "knn_store.tuning": "model",
    "knn_store.explain": "model",
    "knn_store.generation": "model",
    "knn_store.summary": "model",
    "knn_store.pointers": "model",
    "knn_store.decode_memory": "model",
    "knn_store.session": "session",
    "knn_store": "session",  # the package itself: its __init__ imports the session
    "ingest": "ingest",
    "knnlm.service": "service",
    "knnlm": "cli",
}


def layer(module: str) -> str:
    """The layer of a dotted module name: its longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYER_OF:
            return LAYER_OF[name]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every knnlm module ``path`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                anchor = (package or module_name(path)).split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    ours = ("knn_store", "ingest", "knnlm")
    return {m for m in found if m.split(".")[0] in ours and _is_module(m)}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for pkg in ("knn_store", "ingest", "knnlm") for p in (ROOT / pkg).rglob("*.py"))


def above(own: str, imported: set[str]) -> list[str]:
    """The modules of ``imported`` that sit in a layer above ``own``'s."""
    rank = ORDER.index(layer(own))
    return sorted(m for m in imported if ORDER.index(layer(m)) > rank)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    own = module_name(path)
    assert not above(own, imports(path)), (
        f"{own} ({layer(own)}) imports {above(own, imports(path))}"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_query_side_never_imports_the_write_side(path: Path) -> None:
    own = module_name(path)
    if own.startswith(("knn_store", "knnlm.service")):
        assert not {m for m in imports(path) if m.split(".")[0] == "ingest"}, own


def test_the_rules_catch_what_the_review_found(tmp_path: Path) -> None:
    """The store's check once imported the saved policy lazily, inside a function; the
    settings type reached the store through ``open_store``. Both count."""
    assert above("knn_store.store.check", {"knn_store.saved_policy"}) == ["knn_store.saved_policy"]
    assert above("knn_store.store", {"knn_store.settings"}) == ["knn_store.settings"]
    assert above("knn_store.lm", {"knn_store.session"}) == ["knn_store.session"]
    assert above("knnlm.service.app", {"knnlm.cli"}) == ["knnlm.cli"]  # the service, the CLI
    assert above("ingest.worker", {"knnlm.service.batcher"}) == ["knnlm.service.batcher"]
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from knn_store.session import Session\n")
    source = ROOT / "knn_store" / "store" / "check.py"
    assert "knn_store.store.base" in imports(source)
    tree = ast.parse(lazy.read_text())
    assert {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} == {
        "knn_store.session"
    }
