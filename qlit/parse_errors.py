"""One sentence from jsonargparse's report of a bad option: for ``qlit``'s parse errors and a study's cells."""

from __future__ import annotations

import re

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def concise_parse_error(message: str) -> str:
    """One sentence from jsonargparse's nested report: the full key of the offending option and what is wrong.

    jsonargparse explains a bad value once per candidate type of each enclosing Union (e.g. ``QLitModule | None``);
    only the innermost reason names the user's mistake.
    """
    # A key can also open mid-line ('... expects a function or a callable class: Parser key "lr":').
    message = re.sub(r'(?<=\S)\s*(Parser key "[^"]*":)', r"\n\1", message)
    expected = _expected_value(message)
    keys: list[str] = []
    reasons: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line or line.startswith(_NOISE):
            continue
        match = re.match(r'(?:Parser key|Problem with given class_path [^:]+:)\s*"?([^":]*)"?:?$', line)
        if line.startswith("Parser key"):
            key, _, rest = line.partition('":')
            keys.append(key.split('"')[1])
            if rest.strip():  # 'Parser key "config": File does not exist: ...' carries its reason on the line
                reasons.append(rest.strip())
        elif match:
            continue
        else:
            reasons.append(line)
    reason = expected or (reasons[-1] if reasons else message.strip().splitlines()[0])
    reason = re.sub(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", r"got '\2', expected one of \1", reason)
    key = ".".join(k for k in keys if k)
    return f"{key}: {reason}" if key else reason


def _expected_value(message: str) -> str | None:
    """``got 'abc', expected a number`` from the innermost key's report of a value of the wrong type, else None.

    Types a value merely could have been (``None`` of an optional, the tensor a learning rate may also be) come with
    reasons of their own ("Expected a dot import path string"), which name no type and are left out.
    """
    inner = message.rsplit('Parser key "', 1)[-1]
    types = [t for t in re.findall(r"Expected a <class '(?:[\w.]+\.)?(\w+)'>", inner) if t != "NoneType"]
    given = re.search(r"(?:Given value|Got value): (.*?)(?:\. Got value: .*)?$", inner, re.MULTILINE)
    if not types or given is None:
        return None
    # The named values a Union also takes (``auto`` of ``bool | int | Literal["auto"]``).
    named = [v for group in re.findall(r"Expected a typing\.Literal\[(.*?)\]", inner) for v in group.split(", ")]
    words = " or ".join(dict.fromkeys([_TYPE_WORDS.get(t, f"a {t}") for t in types] + named))
    return f"got '{given.group(1).strip()}', expected {words}"
