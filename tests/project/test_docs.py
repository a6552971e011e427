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
