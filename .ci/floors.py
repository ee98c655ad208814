"""Print every dependency of pyproject.toml pinned at its floor (``name>=X`` -> ``name==X``), the dev and
weights extras included: what `make test-floors` installs to prove the floors are versions the tests pass on.
A dependency without a floor is printed as it is (pip takes the newest that fits)."""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in ("dev", "weights"):
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)\s*(.*)$", requirement.split(";")[0].strip())
    name, spec = match.group(1), match.group(2)
    floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    print(f"{name}=={floor.group(1)}" if floor else f"{name}{spec}")
