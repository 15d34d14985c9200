"""Print (or check) the Markdown settings tables that docs/settings.md carries for each service.

docs/settings.md holds each table between ``<!-- settings:NAME -->`` and
``<!-- /settings:NAME -->``; ``--write`` refreshes them from the settings classes,
``--check`` fails when they drifted or a table is missing (``make docs`` writes,
``make docs-check`` checks; ``make test`` runs the check).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_DOC = ROOT / "docs" / "settings.md"
CLASSES = {
    "worker": "services.inference.settings:WorkerSettings",
    "gateway": "gateway.settings:GatewaySettings",
    "trainer": "services.trainer.settings:TrainerSettings",
    "exporter": "services.exporter.settings:ExporterSettings",
    "up": "ferry.stack:UpSettings",
}


def load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def table(cls: type) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        default = field.default if field.default is not PydanticUndefined else None
        if field.default_factory is not None:
            default = field.default_factory()
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `--{name.replace('_', '-')}` | `{prefix}{name.upper()}` | `{default!r}` | {meaning} |"
        )
    return "\n".join(rows)


def render(text: str) -> str:
    for key, path in CLASSES.items():
        pattern = re.compile(rf"(<!-- settings:{key} -->\n)(?:.*?\n)?(<!-- /settings:{key} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, p=path: m.group(1) + table(load(p)) + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = SETTINGS_DOC.read_text()
    new = render(text)
    if args.check:
        missing = [key for key in CLASSES if f"<!-- settings:{key} -->" not in text]
        if missing:
            print(f"{SETTINGS_DOC.relative_to(ROOT)} lacks the settings tables: {', '.join(missing)}")
            return 1
        if new != text:
            print(f"{SETTINGS_DOC.relative_to(ROOT)} settings tables are stale; run `make docs`")
            return 1
        return 0
    if args.write:
        SETTINGS_DOC.write_text(new)
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
