"""The pager's numbered links: a few pages back, this one, the next one only when there is more."""

from __future__ import annotations

from explainer.server.pages import page_numbers


def _url(offset: int) -> str:
    return f"/?o={offset}"


def test_first_page_with_more() -> None:
    pages = page_numbers(0, 10, True, _url)
    assert [(p["number"], p["current"]) for p in pages] == [(1, True), (2, False)]
    assert pages[1]["url"] == "/?o=10"


def test_a_later_page_shows_three_back_and_no_next_when_done() -> None:
    pages = page_numbers(60, 10, False, _url)
    assert [p["number"] for p in pages] == [4, 5, 6, 7]
    assert pages[-1]["current"] and pages[0]["url"] == "/?o=30"


def test_an_offset_inside_a_page_counts_as_that_page() -> None:
    assert [p["number"] for p in page_numbers(15, 10, False, _url) if p["current"]] == [2]


def test_limits_in_plain_words() -> None:
    from explainer.limit_messages import human_bytes, image_too_large, too_many_results

    assert human_bytes(10 * 1024 * 1024) == "10 MB" and human_bytes(1536) == "1.5 KB"
    assert human_bytes(512) == "512 bytes" and human_bytes(3 * 1024**4) == "3072 GB"
    assert image_too_large(10 * 1024 * 1024).startswith("The image is larger than 10 MB")
    assert too_many_results(100, 500) == "Show at most 100 results per page (asked for 500)"
