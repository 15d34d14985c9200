"""tools/docs_check.py: relative links and anchors of README.md and docs/*.md resolve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


docs_check = _load("docs_check")


def test_the_real_docs_have_no_broken_links() -> None:
    files = docs_check.doc_files(ROOT)
    assert ROOT / "README.md" in files
    assert ROOT / "docs" / "settings.md" in files
    assert sum(len(docs_check.links(path)) for path in files) > 20  # the check has something to check
    assert docs_check.check(files, ROOT) == []
    assert docs_check.main(["--root", str(ROOT)]) == 0


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Serving a folder of ONNX models", "serving-a-folder-of-onnx-models"),
        ("Running the stack: `ferry up` and the CLI", "running-the-stack-ferry-up-and-the-cli"),
        ("Benchmarks (`ferry bench`)", "benchmarks-ferry-bench"),
        ("The store and `config.json`", "the-store-and-configjson"),
        ("Train -> watch -> result", "train---watch---result"),
        (
            "What the profiles showed (py-spy, `python -m benchmarks.profile`)",
            "what-the-profiles-showed-py-spy-python--m-benchmarksprofile",
        ),
        ("snake_case [a link](x.md)", "snake_case-a-link"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert docs_check.slug(heading) == anchor


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Project\n\n"
        "See [the guide](docs/guide.md), [its setup](docs/guide.md#setup) and [the web](https://example.com).\n"
        "A [missing page](docs/nowhere.md) here.\n"
        "```bash\n[not a link](in/a/code/block.md)\n```\n"
        "Inline `[not a link](either.md)` code.\n"
    )
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Setup\n\n## Setup\n\n"
        "Back [home](../README.md#project), [twice](#setup-1), [a typo](#set-up), "
        "[wrong file anchor](../README.md#nope).\n\n"
        "[ref]: ../docs/absent.md\n"
    )
    return tmp_path


def test_broken_links_and_anchors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path)
    problems = docs_check.check(docs_check.doc_files(root), root)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "README.md:4: broken link 'docs/nowhere.md'" in text
    assert "docs/guide.md:7: broken anchor '#set-up'" in text
    assert "docs/guide.md:7: broken anchor '../README.md#nope'" in text
    assert "docs/guide.md:9: broken link '../docs/absent.md'" in text
    assert "in/a/code/block.md" not in text and "either.md" not in text and "example.com" not in text

    assert docs_check.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "docs/nowhere.md" in out and "#set-up" in out and "4 broken link(s)" in out


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "README.md").write_text("# Project\n\n[guide](docs/guide.md#guide)\n")
    (root / "docs" / "guide.md").write_text("# Guide\n\n[home](../README.md) [top](#guide)\n")
    assert docs_check.check(docs_check.doc_files(root), root) == []
