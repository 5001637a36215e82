"""Parsing JSON that users hand us: corpus and task lines, dataset sidecars, tokenizer and model configs.

`json.loads` fails on bad input in two ways: `JSONDecodeError`, which knows its line and column, and
`RecursionError` for nesting deeper than the interpreter's recursion limit (a line of 100000 `[`), which
knows neither and escapes every `except ValueError`. `loads` turns the second into the first, so that a
reader reports both as `FILE:LINE: ...`; `read_json_object` does that for a whole file, as a UserError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from data.errors import UserError


def loads(text: str) -> Any:
    """json.loads, raising JSONDecodeError (a ValueError, with line and column) for any malformed text."""
    try:
        return json.loads(text)
    except RecursionError:
        pos, depth = _deepest_opening(text)
        # no ':' in the message: readers quote the part before json's ": line L column C (char P)"
        raise json.JSONDecodeError(f"nested {depth} levels deep, deeper than the JSON parser goes", text, pos) from None


def read_json_object(path: str | Path, fix: str) -> dict:
    """The JSON object in file `path`; anything else is a UserError naming path:line and ending in `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid JSON (not UTF-8 at byte {err.start}); {fix}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}); {fix}") from None
    try:
        value = loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON (column {err.colno}: {err.msg}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}; {fix}")
    return value


def read_jsonl_texts(path: str | Path, key: str = "text") -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of the JSONL file `path`: a JSON object with a string
    under `key`; anything else is a UserError naming path:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = loads(line)[key]
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(f"{path}:{number}: not a JSON line with a \"{key}\" field") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: \"{key}\" is not a string")
            yield number, text


def _deepest_opening(text: str) -> tuple[int, int]:
    """(index, depth) of the first `[` or `{` at the greatest nesting depth, strings skipped."""
    depth = deepest = at = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, i
        elif ch in "]}":
            depth -= 1
    return at, deepest
