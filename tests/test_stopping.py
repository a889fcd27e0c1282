"""StopMatcher: ends before the stop text and never leaks a partial stop string."""
from engine.generation.stopping import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    out.append(m.flush())
    return out, m.stopped


def test_no_stops_passes_through():
    out, stopped = run([], ["a", "b"])
    assert "".join(out) == "ab" and not stopped


def test_stop_inside_one_piece():
    out, stopped = run(["END"], ["hello END world"])
    assert "".join(out) == "hello " and stopped


def test_stop_across_pieces_never_leaks_prefix():
    out, stopped = run(["s Par"], ["The", " capital", " is", " Paris", "."])
    assert stopped and "".join(out) == "The capital i"
    assert all("s P" not in piece for piece in out)


def test_held_back_prefix_released_when_it_does_not_complete():
    out, stopped = run(["<END>"], ["a <", "E", "x"])
    assert not stopped and "".join(out) == "a <Ex"
    assert out[0] == "a "  # "<" was held back until it could not start "<END>"


def test_earliest_of_several_stops_wins():
    out, stopped = run(["world", "lo"], ["hello world"])
    assert "".join(out) == "hel" and stopped


def test_unicode_stop():
    out, stopped = run(["東京"], ["I like 東", "京 a lot"])
    assert "".join(out) == "I like " and stopped


def test_nothing_after_stop():
    m = StopMatcher(["x"])
    assert m.feed("ax") == "a"
    assert m.feed("more") == "" and m.flush() == ""
