"""The docs in the clone: every link resolves, every page is in the site's navigation, no machine paths.

`make docs` (mkdocs build --strict, in CI) renders the site; these checks need no docs extra and run in the
default suite, so a dead link fails `make test` as well. Anchors must exist under both slug rules, mkdocs's
(Python-Markdown's toc) and GitHub's, so a link works on the site and when the file is read on GitHub.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINKED = [ROOT / "README.md", *PAGES]

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+).+?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$")
# Where a clone has nothing: this machine's folders and the steering repo's shared/ next to the project.
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|tmp|home|Users|root)/|\.\./shared/")
ISSUE_NUMBER = re.compile(r"\bissues? \d", re.IGNORECASE)


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a markdown file outside fenced code blocks, with their numbers."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def links(path: Path) -> list[tuple[int, str]]:
    """Every markdown link target of ``path`` outside code, with its line number."""
    return [(number, target) for number, line in prose_lines(path)
            for target in LINK.findall(CODE_SPAN.sub("", line))]


def heading_text(raw: str) -> str:
    """A heading as text, the way both renderers read it: link targets, emphasis and backticks dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return re.sub(r"[`*]", "", text).strip()


def mkdocs_slug(text: str) -> str:
    """Python-Markdown toc's default slugify (what mkdocs uses)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(text: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path, slug) -> set[str]:
    """Every heading anchor of a markdown file under one slug rule (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(heading_text(match.group(2)))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_follow_each_renderer():
    assert mkdocs_slug("Sweeps, seeds and reports") == github_slug("Sweeps, seeds and reports") == \
        "sweeps-seeds-and-reports"
    assert mkdocs_slug("`lsa_is_gd` — one layer") == "lsa_is_gd-one-layer"
    assert github_slug("lsa_is_gd — one layer") == "lsa_is_gd--one-layer"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    inside_docs = path.is_relative_to(DOCS)
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where} names a file that does not exist")
            continue
        if inside_docs and (not resolved.is_file() or not resolved.is_relative_to(DOCS)):
            problems.append(f"{where} leaves docs/ (the site cannot link there; name the file in backticks)")
            continue
        if anchor and resolved.suffix == ".md" and not resolved.is_relative_to(DOCS / "api"):
            if anchor not in anchors(resolved, mkdocs_slug) or anchor not in anchors(resolved, github_slug):
                problems.append(f"{where}: no heading of {resolved.relative_to(ROOT)} has the anchor #{anchor} "
                                "under both mkdocs's and GitHub's slug rules")
    assert not problems, "\n".join(problems)


def nav_pages(node) -> list[str]:
    """The page paths of an mkdocs nav tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    nav = nav_pages(config["nav"])
    pages = {str(page.relative_to(DOCS)) for page in PAGES}
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert sorted(pages - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert len(nav) == len(set(nav)), "a page listed twice in the nav"


def test_api_pages_name_modules_that_exist():
    directives = [(page, match.group(1)) for page in PAGES for _, line in prose_lines(page)
                  if (match := DIRECTIVE.match(line))]
    assert len(directives) >= 10
    missing = [f"{page.relative_to(ROOT)}: ::: {name}" for page, name in directives
               if importlib.util.find_spec(name) is None]
    assert not missing, "mkdocstrings directives naming no module:\n" + "\n".join(missing)


def tracked_text_files() -> list[Path]:
    """The repository's tracked files that are text (UTF-8, no NUL)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_tracked_file_names_a_machine_path_or_a_file_outside_the_clone():
    this = Path(__file__).resolve()
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}"
            for path in tracked_text_files() if path.resolve() != this
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if MACHINE_PATH.search(line)]
    assert not hits, "absolute machine paths or ../shared/ in tracked files:\n" + "\n".join(hits)


def test_user_facing_text_says_what_it_means_not_which_issue():
    texts = [*LINKED, *sorted((ROOT / "recipes").rglob("*.yaml"))]
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}"
            for path in texts for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if ISSUE_NUMBER.search(line)]
    assert not hits, "issue numbers mean nothing to a reader of the clone:\n" + "\n".join(hits)


def test_docstrings_reach_the_api_pages_as_markdown():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("the docs extra is not installed (make docs installs it)")
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("See :class:`~optimizers.LayerwiseMixture` and :func:`metaopt.run`. Example::\n\n    run()\n\n"
            "=====  ==========\nkind   meaning\n=====  ==========\nring   ``i ~ i ± 1``\n"
            "       (mod A)\nstar   a | b\n=====  ==========\n\nafter")
    assert module.markdown(text) == (
        "See `LayerwiseMixture` and `metaopt.run`. Example:\n\n    run()\n\n"
        "| kind | meaning |\n|---|---|\n| ring | ``i ~ i ± 1`` (mod A) |\n| star | a \\| b |\n\nafter")
