"""Prints `name==minimum` for every `name>=minimum` requirement of pyproject.toml (the runtime
dependencies and the `test` extra), for installing the declared lower bounds (`.ci/lower_bounds`).

    python tools/lower_bounds.py > /tmp/lower.txt && pip install -c /tmp/lower.txt -e ".[test]"
"""

import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lower_bounds(pyproject: str) -> list[str]:
  with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
  requirements = project["dependencies"] + project["optional-dependencies"]["test"]
  pins = []
  for requirement in requirements:
    m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)", requirement.strip())
    if m:
      name = re.sub(r"\[.*\]", "", m.group(1))  # extras do not go into a constraints file
      pins.append(f"{name}=={m.group(2)}")
    elif "==" not in requirement:
      sys.exit(f"{requirement!r} has no lower bound; give it one (name>=version)")
  return pins


if __name__ == "__main__":
  print("\n".join(lower_bounds(os.path.join(ROOT, "pyproject.toml"))))
