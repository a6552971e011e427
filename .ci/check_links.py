"""Every link of the README and the built docs site leads somewhere.

    python .ci/check_links.py SITE_DIR

SITE_DIR is the output of ``mkdocs build``. Checked, offline:

* every link and image of every page of the site (the pages written in docs/ and those
  mkdocstrings generates from the docstrings): a link inside the site must name a page or file
  that was built, and an anchor must name an ``id`` on that page;
* every link of README.md: one into the docs site (``site_url`` of mkdocs.yml) must resolve in
  the built site, anchor included; one into this repository on GitHub (``repo_url``,
  ``/blob/main/PATH`` or ``/tree/main/PATH``) must name a file or folder that exists here;
* links from the site into the repository, the same way;
* the Project-URLs of pyproject.toml point where mkdocs.yml says the docs and the repository
  are, and the docs' ones resolve in the built site;
* Read the Docs builds with mkdocs.yml and the locked docs toolchain.

Other external links cannot be reached from CI: they are listed, and each must be a
well-formed ``https://`` URL.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent


def _yaml_value(text: str, key: str) -> str:
    """A top-level ``key: value`` of a YAML file (mkdocs.yml has tags PyYAML needs help with)."""
    match = re.search(rf"^{key}:\s*(\S+)\s*$", text, re.MULTILINE)
    if not match:
        raise SystemExit(f"mkdocs.yml has no {key}")
    return match.group(1)


MKDOCS = (ROOT / "mkdocs.yml").read_text()
SITE_URL = _yaml_value(MKDOCS, "site_url").rstrip("/") + "/"
REPO_URL = _yaml_value(MKDOCS, "repo_url").rstrip("/")
SITE_PATH = urlsplit(SITE_URL).path  # "/en/latest/": absolute links inside the site start so


class _Page(HTMLParser):
    """The links (``href``/``src``) and the anchors (``id``/``name``) of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.anchors: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for attr in ("id", "name") if tag in ("a",) else ("id",):
            if values.get(attr):
                self.anchors.add(str(values[attr]))
        for attr in ("href", "src"):
            value = values.get(attr)
            if value is not None and tag in ("a", "img", "link", "script", "source"):
                self.links.append(value)


class Site:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pages: dict[Path, _Page] = {}
        for path in sorted(directory.rglob("*.html")):
            page = _Page()
            page.feed(path.read_text(encoding="utf-8"))
            self.pages[path] = page

    def resolve(self, path: str) -> Path | None:
        """The built file a site path (relative to the site root) names, or None."""
        target = self.directory / unquote(path)
        if target.is_dir():
            target = target / "index.html"
        return target if target.is_file() else None

    def check(self, site_path: str, fragment: str) -> str | None:
        """Why ``site_path#fragment`` does not resolve, or None if it does."""
        target = self.resolve(site_path)
        if target is None:
            return f"no such page or file in the site: {site_path or '/'}"
        if fragment and target.suffix == ".html" and fragment not in self.pages[target].anchors:
            return f"no anchor #{fragment} on {target.relative_to(self.directory)}"
        return None


def _repo_path(url: str) -> str | None:
    """The repository path a GitHub link of this repository names (None: not such a link)."""
    for kind in ("blob", "tree"):
        prefix = f"{REPO_URL}/{kind}/main/"
        if url.startswith(prefix):
            return urlsplit(url).path.removeprefix(urlsplit(prefix).path)
    return None


def _check_external(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme != "https":
        return "not an https:// URL"
    if not parts.netloc or "." not in parts.netloc or re.search(r"\s", url):
        return "malformed URL"
    path = _repo_path(url)
    if path is not None and not (ROOT / path).exists():
        return f"names {path}, which is not in this repository"
    if url.startswith(REPO_URL) and not re.match(
        rf"{re.escape(REPO_URL)}(/(blob|tree)/main/\S+|/issues(/\d+)?)?/?$", url
    ):
        return "a link into the repository that is neither a file (blob/tree/main) nor its issues"
    return None


def check_absolute(
    url: str, site: Site, where: str, errors: list[str], external: dict[str, set[str]]
) -> None:
    """An absolute URL: into the docs site (resolved there), or elsewhere (listed, checked)."""
    if url.startswith(SITE_URL) or url.rstrip("/") + "/" == SITE_URL:
        parts = urlsplit(url)
        problem = site.check(parts.path.removeprefix(SITE_PATH), parts.fragment)
    else:
        problem = _check_external(url)
        external[url].add(where)
    if problem:
        errors.append(f"{where}: {url}: {problem}")


def check_site(site: Site, errors: list[str], external: dict[str, set[str]]) -> int:
    count = 0
    for path, page in site.pages.items():
        where = str(path.relative_to(site.directory))
        base = "/" + where  # a page's URL path relative to the site root
        for link in page.links:
            count += 1
            parts = urlsplit(link)
            if parts.scheme in ("http", "https"):
                check_absolute(link, site, where, errors, external)
            elif parts.scheme in ("mailto", "data", "javascript"):
                continue
            elif parts.scheme or parts.netloc:
                errors.append(f"{where}: {link}: a link of an unexpected kind")
            else:
                path_in_site = urlsplit(urljoin(base, link)).path
                if link.startswith("/"):  # absolute paths carry the site's prefix (404.html)
                    if not path_in_site.startswith(SITE_PATH):
                        errors.append(f"{where}: {link}: outside the site ({SITE_PATH})")
                        continue
                    path_in_site = "/" + path_in_site.removeprefix(SITE_PATH)
                problem = site.check(path_in_site.lstrip("/"), parts.fragment)
                if problem:
                    errors.append(f"{where}: {link}: {problem}")
    return count


def check_readme(site: Site, errors: list[str], external: dict[str, set[str]]) -> int:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<(https?://[^>\s]+)>", text)
    for link in links:
        if urlsplit(link).hostname in ("127.0.0.1", "localhost"):
            continue  # a local server the README tells you to start (mkdocs serve)
        if not re.match(r"https?://", link):
            errors.append(f"README.md: {link}: relative (it breaks where PyPI shows the README)")
            continue
        check_absolute(link, site, "README.md", errors, external)
    return len(links)


def check_project_urls(site: Site, errors: list[str], external: dict[str, set[str]]) -> None:
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    expected = {
        "Homepage": REPO_URL,
        "Source": REPO_URL,
        "Issues": f"{REPO_URL}/issues",
        "Documentation": SITE_URL,
        "Changelog": f"{SITE_URL}changelog/",
    }
    for name, want in expected.items():
        got = urls.get(name)
        if got is None or got.rstrip("/") != want.rstrip("/"):
            errors.append(
                f"pyproject.toml: Project-URL {name} is {got!r}; mkdocs.yml says {want!r}"
            )
        else:
            check_absolute(got, site, f"pyproject.toml {name}", errors, external)


def check_readthedocs(errors: list[str]) -> None:
    text = (ROOT / ".readthedocs.yaml").read_text()
    for needed in ("configuration: mkdocs.yml", "requirements: requirements/docs.txt"):
        if needed not in text:
            errors.append(f".readthedocs.yaml: does not say {needed!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0], "index.html").is_file():
        print(__doc__, file=sys.stderr)
        return 2
    site = Site(Path(argv[0]))
    errors: list[str] = []
    external: dict[str, set[str]] = defaultdict(set)
    in_site = check_site(site, errors, external)
    in_readme = check_readme(site, errors, external)
    check_project_urls(site, errors, external)
    check_readthedocs(errors)
    print("External links (not reachable from CI; checked to be well-formed https URLs, and")
    print(f"those into {REPO_URL} to name something in this repository):")
    for url in sorted(external):
        where = sorted(external[url])
        print(f"  {url}  ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})")
    print(
        f"{in_site} links in {len(site.pages)} pages of the site, {in_readme} in README.md, "
        f"{len(external)} distinct external URLs: {len(errors)} broken"
    )
    for error in errors:
        print(f"BROKEN {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
