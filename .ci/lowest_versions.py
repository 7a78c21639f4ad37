"""Print a pip constraints file pinning each runtime dependency to the lower bound pyproject.toml declares
(`numpy>=1.26` -> `numpy==1.26`), so that CI tests exactly what the package promises to work with."""
import re
import sys
import tomllib
from pathlib import Path

dependencies = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
for dependency in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", dependency.replace(" ", ""))
    if not match:
        sys.exit(f"pyproject.toml: dependency {dependency!r} has no plain `>=` lower bound to test")
    print(f"{match[1]}=={match[2]}")
