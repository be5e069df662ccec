"""Generated sections of a results page (``docs/results.md``).

A section is the text between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``.
The script that measures it rewrites it whole, opened by the command, commit, date, machine and
library versions that produced it, so the page cannot drift from the runs; the rest of the page
is left as it is. A page without the section gets it appended.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

BEGIN = "<!-- generated: {name} -->"
END = "<!-- end generated: {name} -->"
#: Libraries named in a section's header.
LIBRARIES = ("torch", "transformers", "lightning", "peft")


def provenance(command: str, env: dict[str, Any], date: datetime.date | None = None) -> str:
    """``command · commit abc1234 · 2026-12-07 · machine · Python 3.12.3, torch 2.14.1, ...`` from an
    environment block as ``mllm_cl.system.environment.environment()`` makes it."""
    code = env.get("code") or {}
    commit = (f"commit {code['commit'][:7]}{' (uncommitted changes)' if code.get('dirty') else ''}"
              if code.get("commit") else code.get("note", "commit unknown"))
    machine = (env["cuda"]["device_name"] if "cuda" in env
               else f"{env['cpu']} ({os.cpu_count()} cores, {env['threads']} threads), no GPU")
    packages = env.get("packages") or {}
    versions = ", ".join([f"Python {env['python']}"] + [f"{p} {packages[p]}" for p in LIBRARIES if packages.get(p)])
    return " · ".join([f"`{command}`", commit, (date or datetime.date.today()).isoformat(), machine, versions])


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` set to ``body`` (appended when the page has no such section)."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if begin in text or end in text:
        raise ValueError(f"the section {name!r} has one of its two markers only ({begin} ... {end})")
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def write_section(page: str | Path, name: str, body: str) -> Path:
    """Rewrite section ``name`` of ``page`` (created when missing)."""
    page = Path(page)
    text = page.read_text() if page.exists() else ""
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(replace_section(text, name, body))
    return page
