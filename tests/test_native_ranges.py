"""libmach/ranges.py against a page-by-page model (no machd needed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pymach.libmach.ranges import Ranges

spans = st.tuples(st.integers(0, 60), st.integers(1, 20)).map(lambda t: (t[0], t[0] + t[1]))
ops = st.lists(st.tuples(st.booleans(), spans, st.integers(0, 7)), max_size=40)


@given(ops, spans)
def test_ranges_agree_with_a_page_model(steps: list[tuple[bool, tuple[int, int], int]],
                                        query: tuple[int, int]) -> None:
    r, model = Ranges(), {}
    for is_set, (a, b), prot in steps:
        if is_set:
            r.set(a, b, prot)
            model.update({x: prot for x in range(a, b)})
        else:
            r.remove(a, b)
            for x in range(a, b):
                model.pop(x, None)
        assert r.starts == sorted(r.starts) == [s for s, _, _ in r.spans]
        assert all(e1 <= s2 for (_, e1, _), (s2, _, _) in zip(r.spans, r.spans[1:], strict=False))
    a, b = query
    got = r.protections(a, b)
    if all(x in model for x in range(a, b)):
        assert got is not None and set(got) == {model[x] for x in range(a, b)}
    else:
        assert got is None
