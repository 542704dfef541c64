"""The command line's filter syntax -> an mps.common.v1.Filter (the gateway checks it as it checks any).

    brand=acme,in_stock=true        comma: AND (every clause holds)
    colour=red|blue                 |: set membership (the label is one of these values)
    brand!=acme                     !=: negation (no label brand, or another value)
    colour!=red|blue                none of these values (or no label colour)
    gift=*   gift!=*                the label is present (any value) / absent
    brand=acme;brand=zeta,sale=yes  ;: OR between AND groups ((brand=acme) OR (brand=zeta AND sale=yes))

Keys and values are names (letters, digits, single inner spaces and `_-.:/@+`), so `,`, `|`, `;`,
`=`, `!` and `*` never occur in them; spaces around the separators are ignored. The path prefix and
the tags are separate options (--path, --tag, --any-tag): they hold for every OR group.
"""

from __future__ import annotations

from collections.abc import Sequence

from mps.common.v1 import common_pb2

SYNTAX = (
    "KEY=V (equality), KEY=V1|V2 (one of), KEY!=V or KEY!=V1|V2 (none of, or no such label), KEY=* / KEY!=* "
    "(has / has not the label); ',' between clauses is AND, ';' between groups of clauses is OR"
)


class FilterSyntaxError(ValueError):
    """A filter text that does not parse; the message says where and shows the syntax."""


def _clause(text: str) -> common_pb2.LabelClause:
    negate = "!=" in text
    key, separator, values = text.partition("!=" if negate else "=")
    key, values = key.strip(), values.strip()
    if not separator or not key:
        raise FilterSyntaxError(f"{text.strip()!r} is not a label clause: write {SYNTAX}")
    if values == "*":
        return common_pb2.LabelClause(key=key, negate=negate)
    parts = [v.strip() for v in values.split("|")]
    if not all(parts):
        raise FilterSyntaxError(f"{text.strip()!r} has an empty value: write {SYNTAX}")
    return common_pb2.LabelClause(key=key, values=parts, negate=negate)


def _group(text: str) -> list[common_pb2.LabelClause]:
    return [_clause(part) for part in text.split(",") if part.strip()]


def parse_filter(
    text: str = "", path_prefix: str = "", all_tags: Sequence[str] = (), any_tags: Sequence[str] = ()
) -> common_pb2.Filter:
    """`text` in the syntax above, with a path prefix and tags -> the Filter (empty when all are)."""
    out = common_pb2.Filter(path_prefix=path_prefix.strip(), all_tags=list(all_tags), any_tags=list(any_tags))
    groups = [g for g in text.split(";") if g.strip()] if text else []
    if len(groups) == 1:
        out.labels.extend(_group(groups[0]))
    elif groups:
        out.any_of.extend(common_pb2.Filter(labels=_group(g)) for g in groups)
    return out
