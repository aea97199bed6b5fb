"""PageFlags: one flag per page, marked, cleared and filtered a packet's offsets at a time
(in C), with the counts post-copy's destination keeps its "pages left" by and the filter
its source skips pages already sent with."""

from __future__ import annotations

from array import array

import pytest

from zcmigrate.multifd.pageflags import PageFlags

PS = 4096


def offs(*pages: int) -> array[int]:
    return array("Q", [p * PS for p in pages])


def test_marking_counts_only_pages_not_pending_before() -> None:
    p = PageFlags(16, PS)
    assert p.mark(offs(1, 2, 3)) == 3
    assert p.mark(offs(3, 4)) == 1  # page 3 was pending already
    assert [p[i] for i in range(6)] == [False, True, True, True, True, False]
    assert p.snapshot() == bytes([0, 1, 1, 1, 1] + [0] * 11)


def test_clearing_counts_the_pages_that_were_pending_and_a_repeat_counts_nothing() -> None:
    p = PageFlags(16, PS)
    p.mark(offs(5, 6, 7))
    assert p.clear(offs(6, 7, 8)) == 2  # 8 was never pending: a zero page, say
    assert p.clear(offs(6, 7)) == 0  # a second copy of a page changes nothing
    assert [p[i] for i in (5, 6, 7, 8)] == [True, False, False, False]


def test_only_the_first_count_offsets_are_used() -> None:
    p = PageFlags(8, PS)
    assert p.mark(offs(0, 1, 2), 2) == 2
    assert not p[2]


def test_set_page_by_number_says_whether_it_was_clear() -> None:
    p = PageFlags(4, PS)
    assert p.set_page(3) is True
    assert p.set_page(3) is False


@pytest.mark.parametrize("bad", [[PS, 16 * PS], [PS + 1], [1 << 63]])
def test_an_offset_past_the_image_or_unaligned_changes_nothing(bad: list[int]) -> None:
    p = PageFlags(16, PS)
    with pytest.raises(ValueError, match=r"unaligned to 4096 bytes or past page 16"):
        p.mark(array("Q", bad))
    assert p.snapshot() == bytes(16)


def test_more_offsets_asked_for_than_given_are_refused() -> None:
    with pytest.raises(ValueError, match="offsets"):
        PageFlags(4, PS).mark(offs(1), 2)


def test_unset_only_keeps_the_offsets_whose_page_is_clear_in_order() -> None:
    p = PageFlags(16, PS)
    p.mark(offs(3, 5))
    assert list(p.unset_only(offs(7, 5, 3, 2))) == [7 * PS, 2 * PS]
    assert list(p.unset_only(offs(3, 5))) == []
    assert list(p.unset_only(array("Q"))) == []


def test_unset_only_refuses_an_offset_past_the_image() -> None:
    with pytest.raises(ValueError, match="past page 4"):
        PageFlags(4, PS).unset_only(offs(1, 4))


def test_the_bitmap_has_a_bit_for_each_page_set() -> None:
    p = PageFlags(130, PS)
    p.mark(offs(0, 63, 64, 129))
    assert list(p.bitmap()) == [1 | 1 << 63, 1, 1 << 1]
    assert list(PageFlags(0, PS).bitmap()) == []
