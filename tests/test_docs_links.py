"""Every relative link in the README and docs/ resolves, and no file names a document that does not ship."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.M)
#: Markdown files the framework writes into a run folder (not documents of the repository).
RUN_OUTPUTS = {"report.md", "comparison.md", "ablations.md", "separability.md"}
DOC_NAME = re.compile(r"(?<![\w{}/.-])((?:\.\./)*(?:[\w-]+/)*[\w-]+\.md)\b")


def _files(*patterns: str) -> list[Path]:
    """Tracked files and new ones not yet added (so the check runs on a working tree too)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return sorted({ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()})


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in HEADING.findall(text)}


def _pages() -> list[Path]:
    return [p for p in _files("*.md") if not p.is_relative_to(ROOT / "tests")]


def test_every_relative_link_in_the_documents_resolves():
    broken = []
    for page in _pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_no_file_names_a_document_that_does_not_ship():
    missing = []
    for path in _files("*.md", "*.py", "*.yaml", "*.toml", "Makefile"):
        if path == Path(__file__):  # its own examples
            continue
        for name in DOC_NAME.findall(path.read_text(errors="replace")):
            if Path(name).name in RUN_OUTPUTS or name.startswith(("RUNS/", "RUN/")):
                continue
            candidates = [path.parent / name, ROOT / name, ROOT / "docs" / name]
            if not any(c.resolve().is_file() for c in candidates):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "documents named but not shipped:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_document(tmp_path):
    assert DOC_NAME.findall("see methods.md and docs/methods/same.md, not runs/x/report.md") == [
        "methods.md", "docs/methods/same.md", "runs/x/report.md"]
    assert _slug("The CoIN-shaped sequence") == "the-coin-shaped-sequence"
    assert _slug("`mllm-cl plan`: what it costs") == "mllm-cl-plan-what-it-costs"
