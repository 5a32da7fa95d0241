"""The documentation says what the code offers: every command, option, request field and exit
status is in it, every relative link leads somewhere, and the README fits a first visit.

Read from the code (the click group, the request parser), so a new option or field fails here
until it is documented."""

import dataclasses
import re
from pathlib import Path

import click
import pytest

from seqforget import requests
from seqforget.cli import EXIT_CODES, cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def commands() -> dict[str, click.Command]:
    """Every command of `seqforget`, entry-point commands (the demo) included."""
    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def long_flags(command: click.Command) -> list[str]:
    return [flag for p in command.params if isinstance(p, click.Option)
            for flag in (*p.opts, *p.secondary_opts) if flag.startswith("--")]


def sections(text: str) -> dict[str, str]:
    """Second-level heading -> the text under it, up to the next one."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def request_fields() -> set[str]:
    """Every key the request parser accepts: its contract and every training setting."""
    return set(requests._CONTRACT) | {f.name for f in dataclasses.fields(requests.Training)}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def test_every_command_is_documented_with_every_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    by_heading = sections(text)
    assert len(commands()) >= 11
    for name, command in commands().items():
        heading = f"`seqforget {name}`"
        assert heading in by_heading, f"docs/cli.md has no section {heading}"
        missing = [flag for flag in long_flags(command)
                   if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", by_heading[heading])]
        assert not missing, f"docs/cli.md, {heading}, does not mention {missing}"


def test_the_readme_lists_every_command():
    text = README.read_text()
    missing = [name for name in commands() if f"`seqforget {name}" not in text]
    assert not missing, f"README.md's table of commands lacks {missing}"


def test_every_request_field_is_a_key_of_the_annotated_request():
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs" / "requests.md").read_text(), flags=re.S | re.M)
    keys = {m for block in blocks for m in re.findall(r"^(?:#\s*)?([a-z_]+):", block, flags=re.M)}
    assert not request_fields() - keys, f"docs/requests.md's request lacks {sorted(request_fields() - keys)}"
    assert not keys - request_fields(), f"docs/requests.md shows fields the parser refuses: {sorted(keys - request_fields())}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve()
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}, whose heading does not exist"


def test_every_exit_status_is_in_both_tables():
    statuses = {0, 2} | {code for _, code in EXIT_CODES}
    for page in (README, ROOT / "docs" / "cli.md"):
        rows = set(map(int, re.findall(r"^\| (\d+) \|", page.read_text(), flags=re.M)))
        assert rows == statuses, f"{page.name}'s exit-status table: {sorted(rows)}, the CLI's: {sorted(statuses)}"


def test_the_readme_fits_a_first_visit_and_gives_the_command_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "    python3 -m pytest -q " in text and "    seqforget demo " in text
    assert "\npython3 -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()
