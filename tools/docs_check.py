"""Check the relative links of README.md and docs/*.md.

Every relative link must point at a file (or folder) that exists, and a ``#anchor`` into a
Markdown file (or within the same file) must name one of its headings, slugged the way GitHub
does it. Prints one line per problem and exits 1 when there is any; ``make docs-check`` runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) or ![alt](target), with an optional "title"; target may be <wrapped>.
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/ (sorted)."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    return files + sorted((root / "docs").glob("*.md"))


def _prose_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading text: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _, -, spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in a Markdown file, code spans and blocks excluded."""
    found = []
    for number, line in _prose_lines(path.read_text()):
        line = INLINE_CODE.sub("", line)
        for match in INLINE_LINK.finditer(line):
            found.append((number, match.group(1)))
        ref = REFERENCE_LINK.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def check_file(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the relative links of one file, as 'file:line: message'."""
    problems = []
    try:
        shown = path.relative_to(root)
    except ValueError:
        shown = path
    cache: dict[Path, set[str]] = {}
    for number, target in links(path):
        if not target or EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if file_part.startswith("/"):
            dest = root / file_part.lstrip("/")
        else:
            dest = (path.parent / file_part) if file_part else path
        if not dest.exists():
            problems.append(f"{shown}:{number}: broken link {target!r}: {file_part} does not exist")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            known = cache.setdefault(dest, anchors(dest))
            if unquote(anchor).lower() not in known:
                problems.append(
                    f"{shown}:{number}: broken anchor {target!r}: no heading '#{anchor}' in {dest.name}"
                )
    return problems


def check(files: Iterable[Path], root: Path = ROOT) -> list[str]:
    """Problems of every file given."""
    return [problem for path in files for problem in check_file(path, root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = doc_files(root)
    problems = check(files, root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} broken link(s) in {len(files)} file(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
