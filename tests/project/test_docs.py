"""The documentation keeps up with the code: every public name has a reference entry, and the
README's links work where the README is also shown (the package index, with no docs/ beside it).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import aioancillary

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"


def test_every_public_name_has_exactly_one_reference_entry() -> None:
    """Adding a public name is one line (``::: aioancillary.Name``) in one reference page."""
    entries = Counter(
        name
        for page in REFERENCE.glob("*.md")
        for name in re.findall(r"^::: aioancillary\.([A-Za-z]\w*)$", page.read_text(), re.MULTILINE)
    )
    missing = sorted(set(aioancillary.__all__) - set(entries))
    unknown = sorted(set(entries) - set(aioancillary.__all__))
    twice = sorted(name for name, count in entries.items() if count > 1)
    assert not missing, f"public names with no reference entry: {missing}"
    assert not unknown, f"reference entries for names that are not public: {unknown}"
    assert not twice, f"names documented twice: {twice}"


def test_readme_links_are_absolute() -> None:
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert targets
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, f"relative links break on the package index: {relative}"


def test_docstrings_cross_reference_with_mkdocstrings_syntax() -> None:
    """Cross-references are ``[`Name`][aioancillary.Name]`` (or plain code): a Sphinx role such as
    ``:class:`Name``` renders as literal text on the site, since nothing translates it."""
    role = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj|const):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line)
    ]
    assert not found, f"Sphinx roles (use [`Name`][aioancillary.Name]): {found}"
