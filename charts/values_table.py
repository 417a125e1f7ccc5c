"""The chart's values table in charts/kubetune/README.md, generated from values.schema.json
(descriptions, types, allowed values) and values.yaml (defaults), so the docs cannot drift.

    python charts/values_table.py --write   # rewrite the table (make crd does)
    python charts/values_table.py --check   # exit 1 when README.md is stale (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "kubetune"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def _rows(schema: dict[str, Any], values: Any, prefix: str = "") -> list[str]:
    rows = []
    for key, prop in schema.get("properties", {}).items():
        name = f"{prefix}{key}"
        default = values.get(key) if isinstance(values, dict) else None
        if prop.get("type") == "object" and "properties" in prop:
            rows += _rows(prop, default or {}, f"{name}.")
            continue
        kind = prop.get("type", "object")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        if "enum" in prop:
            kind += ": " + ", ".join(f"`{v}`" for v in prop["enum"])
        shown = f"`{json.dumps(default)}`"
        description = prop.get("description", "").replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {shown} | {description} |")
    return rows


def render() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = ["| Value | Type | Default | Description |", "|---|---|---|---|"]
    return "\n".join([BEGIN, *lines, *_rows(schema, values), END])


def updated_readme() -> str:
    readme = (CHART / "README.md").read_text()
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render() + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    wanted = updated_readme()
    readme = CHART / "README.md"
    if args.check:
        if readme.read_text() != wanted:
            print(f"{readme} is stale: run `make crd`", file=sys.stderr)
            return 1
        return 0
    temporary = readme.with_name("README.md.tmp")
    temporary.write_text(wanted)
    temporary.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
