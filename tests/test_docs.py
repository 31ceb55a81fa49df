"""Numbers in the documentation are the committed results files': every results table in README.md and
docs/ is preceded by `<!-- results: <file> -->` (or `<!-- results: <file> table N -->` for the N-th
table of a file that holds several) and equals that table of the file, which the command named beside
it writes."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- results: (\S+?)(?: table (\d+))? -->")


def tables(text: str) -> list[tuple[tuple[str, int] | None, list[str]]]:
    """Every Markdown table of a document: ((the results file its marker names, which of its tables), or
    None; the table's lines)."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            before = [line for line in lines[max(0, start - 3) : start] if line.strip()]
            marker = MARKER.search(before[-1]) if before else None
            source = (marker.group(1), int(marker.group(2) or 1)) if marker else None
            found.append((source, lines[start:i]))
        i += 1
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_results_table_equals_the_file_it_names(document):
    for source, table in tables(document.read_text()):
        if source is None:
            assert "AUROC" not in table[0], f"{document.name}: a results table without a `<!-- results: FILE -->` marker"
            continue
        name, number = source
        path = REPO / name
        assert path.is_file(), f"{document.name} cites {name}, which is not in the repository"
        in_file = [lines for _, lines in tables(path.read_text())]
        assert len(in_file) >= number, f"{document.name} cites table {number} of {name}, which has {len(in_file)}"
        assert table == in_file[number - 1], f"{document.name}: the table citing {name} differs from it; regenerate it"


def test_the_table_finder_reads_markers():
    text = "x\n<!-- results: results/a.md -->\n\n| a |\n|---|\n| 1 |\n\n| b |\n|---|\n"
    assert tables(text) == [(("results/a.md", 1), ["| a |", "|---|", "| 1 |"]), (None, ["| b |", "|---|"])]
    assert tables("<!-- results: r.md table 2 -->\n| c |\n")[0][0] == ("r.md", 2)
