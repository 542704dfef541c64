"""The command line's filter syntax (gateway/filter_text.py) -> mps.common.v1.Filter, and what the
gateway's check says of what it builds."""

import pytest

from gateway.filter_text import FilterSyntaxError, parse_filter
from index_server.convert import filter_of
from index_server.domain import ProductAttributes
from mps.common.v1 import common_pb2


def clause(key, *values, negate=False):
    return common_pb2.LabelClause(key=key, values=list(values), negate=negate)


def test_comma_is_and_bar_is_membership_bang_is_negation():
    spec = parse_filter("brand=acme, colour = red|blue ,size!=xl")
    assert list(spec.labels) == [
        clause("brand", "acme"),
        clause("colour", "red", "blue"),
        clause("size", "xl", negate=True),
    ]
    assert not spec.any_of and not spec.path_prefix


def test_star_is_presence_and_absence():
    spec = parse_filter("gift=*,discontinued!=*")
    assert list(spec.labels) == [clause("gift"), clause("discontinued", negate=True)]


def test_semicolon_is_or_between_groups_and_path_and_tags_hold_for_all():
    spec = parse_filter("brand=acme;brand=zeta,sale=yes", "fashion/tops", ["striped"], ["cotton", "wool"])
    assert spec.path_prefix == "fashion/tops" and list(spec.all_tags) == ["striped"]
    assert list(spec.any_tags) == ["cotton", "wool"]
    assert [list(f.labels) for f in spec.any_of] == [
        [clause("brand", "acme")],
        [clause("brand", "zeta"), clause("sale", "yes")],
    ]
    compiled = filter_of(spec)
    assert compiled is not None

    def product(path, tags, **labels):
        return ProductAttributes(path, frozenset(tags), labels)

    assert compiled.matches(product("fashion/tops/shirt", {"striped", "wool"}, brand="acme"))
    assert compiled.matches(product("fashion/tops", {"striped", "cotton"}, brand="zeta", sale="yes"))
    assert not compiled.matches(product("fashion/tops", {"striped", "cotton"}, brand="zeta"))
    assert not compiled.matches(product("fashion/topshop", {"striped", "cotton"}, brand="acme"))
    assert not compiled.matches(product("fashion/tops", {"striped"}, brand="acme"))


def test_nothing_is_the_empty_filter():
    assert parse_filter("").ByteSize() == 0 and parse_filter(" , ").ByteSize() == 0
    assert filter_of(parse_filter("")) is None


@pytest.mark.parametrize("text", ["brand", "=acme", "brand=acme|", "brand=", "a=b,,=c"])
def test_malformed_text_says_the_syntax(text):
    with pytest.raises(FilterSyntaxError, match="KEY=V"):
        parse_filter(text)
