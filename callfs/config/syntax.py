"""What a config or credentials file's syntax error says: what is wrong and where, never the
source text around it (it may hold a secret)."""

from __future__ import annotations

import json
import re

import yaml

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def syntax_error(exc: Exception) -> str:
    """What is wrong and where, never the text around it: PyYAML's message quotes the source
    line, which may hold a secret (an unterminated ``internal_proxy_secret: "...``), and the
    message goes to stderr and the journal before any secret is known to the log filter."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p) or "invalid YAML"
        # PyYAML quotes tokens of the source in them too ("found undefined alias 'S3cr3t'")
        what = _QUOTED.sub("'…'", what)
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return what + where
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, yaml.YAMLError):
        return "invalid YAML"
    return type(exc).__name__
