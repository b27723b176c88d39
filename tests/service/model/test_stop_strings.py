from service.model.stop_strings import StopStringMatcher


def run(stops, pieces):
    m = StopStringMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped


def test_stop_string_split_across_pieces_is_cut_and_not_emitted():
    assert run(["END"], ["Hello E", "N", "D and more"]) == ("Hello ", True)


def test_partial_match_that_fails_is_released():
    assert run(["END"], ["Hello EN", "ough said"]) == ("Hello ENough said", False)


def test_earliest_of_several_stops_wins_and_text_held_until_decided():
    m = StopStringMatcher(["\n\n", "###"])
    assert m.feed("a #") == ("a ", False)
    assert m.feed("#") == ("", False)
    assert m.feed("x\n") == ("##x", False)
    assert m.feed("\nrest") == ("", True)


def test_no_stops_passes_everything_through():
    assert run([], ["a", "b"]) == ("ab", False)
