"""The README's settings table and first commands stay true to the code and to CI."""
import dataclasses
import re
from pathlib import Path

import vmafx_sidecar as vs

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_every_setting_with_its_default():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.M)}
    for f in dataclasses.fields(vs.Config):
        assert f.metadata["env"] in rows, f.metadata["env"]
        assert vs.parse_setting(rows[f.metadata["env"]], type(f.default), vs.ANY, "") == f.default


def test_ci_runs_the_readme_test_command():
    test_command = (ROOT / "README.md").read_text().split("```sh\n")[1].splitlines()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
