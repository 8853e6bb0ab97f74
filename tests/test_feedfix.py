"""bridge/mail/feedfix.py: the feed parser's end-of-line search gives what the regex it
replaces gives, for any text."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from bridge.mail import feedfix

REGEX = re.compile(r"(\r\n|\r|\n)\Z")  # email.feedparser.NLCRE_eol


@given(st.text(alphabet=st.sampled_from("ab\r\n \t"), max_size=12))
def test_the_end_of_line_search_matches_the_regex(text: str) -> None:
    expected = REGEX.search(text)
    got = feedfix._EndOfLineAtEnd().search(text)
    assert (got is None) == (expected is None)
    if got is not None and expected is not None:
        assert got.group(0) == expected.group(0)


def test_installed_for_the_feed_parser() -> None:
    from email import feedparser

    import bridge.mail.emailpolicy  # noqa: F401 (installs it)

    assert isinstance(feedparser.NLCRE_eol, feedfix._EndOfLineAtEnd)
