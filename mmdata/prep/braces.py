"""Brace patterns for input.tars: ``shards-{000..009}.tar`` -> shards-000.tar ... shards-009.tar, lazily."""

from __future__ import annotations

import re
from typing import Iterator

from mmdata.config import ConfigError

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` lists."""
    return list(iter_braces(pattern))


def iter_braces(pattern: str) -> Iterator[str]:
    """What :func:`expand_braces` lists, one at a time: nothing is expanded ahead (a range of a billion names
    costs nothing until iterated) and nesting is a stack, not recursion (any number of groups)."""
    stack: list[Iterator[str]] = [iter((pattern,))]
    while stack:
        text = next(stack[-1], None)
        if text is None:
            stack.pop()
            continue
        match = _BRACES.search(text)
        if match is None:
            yield text
            continue
        stack.append(_joined(text[:match.start()], _brace_items(match.group(1), pattern), text[match.end():]))


def _brace_items(body: str, pattern: str) -> Iterator[str]:
    rng = _RANGE.fullmatch(body)
    if rng is None:
        return iter(body.split(","))
    lo, hi = rng.group(1), rng.group(2)
    if max(len(lo), len(hi)) > 18:
        raise ConfigError("input.tars", f"brace range {{{body[:60]}}} in {pattern[:200]!r} has numbers of over 18 "
                                        "digits")
    return (str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))


def _joined(head: str, items: Iterator[str], tail: str) -> Iterator[str]:
    for item in items:
        yield head + item + tail
