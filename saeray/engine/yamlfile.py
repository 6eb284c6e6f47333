"""YAML config files read strictly: a key given twice in one mapping is an error, not "the last one wins"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise DuplicateKey(f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}): "
                                   "keep one of them")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read(path: Path) -> Any:
    """The YAML document in `path`, refusing duplicate keys (DuplicateKey) and other YAML errors (yaml.YAMLError)."""
    return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
