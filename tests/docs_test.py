"""The documents: every "docs/design.md §n" citation in the repository names a section that
exists, nothing cites a design file outside the repository, and the README's layout
section names the library's modules."""

from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ("ilbp", "experiments", "benchmarks", "tests", "notebooks", "scripts", "docs")
SUFFIXES = (".py", ".ipynb", ".md", ".sh")
# "docs/design.md §3", "§2.2", "§1–2" (a range of sections).
CITATION = re.compile(r"docs/design\.md\s+§(\d+(?:\.\d+)*)(?:[–-](\d+(?:\.\d+)*))?")
STALE = "DESIGN" + ".md"  # the starting notes' name, spelt so that this file passes
HEADING = re.compile(r"^#{2,}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text()))


def text_of(path: pathlib.Path) -> str:
    """A file's text; a notebook's cells joined, so a citation split across JSON source
    lines is read whole."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n".join("".join(cell["source"]) for cell in cells)
    return path.read_text()


def files() -> list[pathlib.Path]:
    found = [ROOT / "README.md"]
    for top in SCANNED:
        found += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return found


def test_design_has_numbered_sections():
    assert {"1", "2", "3", "4", "5", "6"} <= sections()


def test_every_citation_names_an_existing_section():
    known = sections()
    cited, dead = 0, []
    for path in files():
        for match in CITATION.finditer(text_of(path)):
            cited += 1
            dead += [
                f"{path.relative_to(ROOT)}: §{n}" for n in match.groups() if n and n not in known
            ]
    assert cited >= 20, cited  # the scan finds the citations (the code has ~26)
    assert not dead, f"citations of sections docs/design.md lacks: {dead}"


def test_no_design_file_outside_the_repository_is_cited():
    # The design notes the project started from are not in the repository.
    stale = [str(p.relative_to(ROOT)) for p in files() if STALE in text_of(p)]
    assert not stale, f"cite docs/design.md instead of {STALE} in {stale}"


def test_readme_layout_names_every_library_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+\.py)`", layout))
    modules = {
        p.name
        for folder in ("ilbp", "ilbp/models", "ilbp/pipeline")
        for p in (ROOT / folder).glob("*.py")
        if p.name != "__init__.py"
    }
    assert modules <= named, f"the README's layout does not name {sorted(modules - named)}"
    existing = {p.name for p in ROOT.rglob("*.py")}
    assert named <= existing, f"the README's layout names missing {sorted(named - existing)}"
    for folder in re.findall(r"^- `(\w+)/`", layout, re.MULTILINE):
        assert (ROOT / folder).is_dir(), folder
