"""The docs stay true to the code, to CI and to each other: the README's settings table, its first
commands, its code map, and every relative link and anchor between the Markdown files."""
import dataclasses
import re
from pathlib import Path

import vmafx_sidecar as vs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "chart/README.md", "BENCHMARKS.md"]


def test_readme_lists_every_setting_with_its_default():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.M)}
    for f in dataclasses.fields(vs.Config):
        assert f.metadata["env"] in rows, f.metadata["env"]
        assert vs.parse_setting(rows[f.metadata["env"]], type(f.default), f.metadata["check"], "") == f.default


def test_ci_runs_the_readme_test_command():
    test_command = (ROOT / "README.md").read_text().split("```sh\n")[1].splitlines()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_code_map_names_every_section_of_the_sidecar():
    code_map = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `vmafx_sidecar.py` |"))
    sections = re.findall(r"^# ---- (.+?)(?::.*)? ----$", (ROOT / "vmafx_sidecar.py").read_text(), re.M)
    assert sections
    positions = [code_map.find(name) for name in sections]
    assert -1 not in positions, [name for name, at in zip(sections, positions) if at < 0]
    assert positions == sorted(positions), "the code map names the sections in another order than the file"


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a ```sh block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for line in prose_lines(path.read_text()):
        if m := re.match(r"#{1,6} (.+)", line):
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_relative_link_and_anchor_resolves():
    assert not (ROOT / "benchmarks" / "README.md").exists()  # folded into BENCHMARKS.md
    for doc in DOCS:
        source = ROOT / doc
        for line in prose_lines(source.read_text()):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                path = (source.parent / file).resolve() if file else source
                assert path.exists(), f"{doc}: {target}"
                if anchor:
                    assert anchor in anchors(path), f"{doc}: {target}"
