"""Numbers in the documentation are the committed results files': every results table in README.md and
docs/ is preceded by `<!-- results: <file> -->` and equals that file, which the command named beside it
writes."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- results: (\S+) -->")


def tables(text: str) -> list[tuple[str | None, list[str]]]:
    """Every Markdown table of a document: (the results file its marker names, or None; its lines)."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            before = [line for line in lines[max(0, start - 3) : start] if line.strip()]
            marker = MARKER.search(before[-1]) if before else None
            found.append((marker.group(1) if marker else None, lines[start:i]))
        i += 1
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_results_table_equals_the_file_it_names(document):
    for source, table in tables(document.read_text()):
        if source is None:
            assert "AUROC" not in table[0], f"{document.name}: a results table without a `<!-- results: FILE -->` marker"
            continue
        path = REPO / source
        assert path.is_file(), f"{document.name} cites {source}, which is not in the repository"
        expected = [line for line in path.read_text().splitlines() if line.startswith("|")]
        assert table == expected, f"{document.name}: the table citing {source} differs from the file; regenerate it"


def test_the_table_finder_reads_markers():
    text = "x\n<!-- results: results/a.md -->\n\n| a |\n|---|\n| 1 |\n\n| b |\n|---|\n"
    assert tables(text) == [("results/a.md", ["| a |", "|---|", "| 1 |"]), (None, ["| b |", "|---|"])]
