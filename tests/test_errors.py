from ssd300.errors import one_line


def test_one_line_keeps_type_and_first_line_and_caps_the_length():
    assert one_line(ValueError("bad   header\n  at byte 7\n")) == "ValueError: bad header"
    assert one_line(OSError()) == "OSError"
    long = one_line(RuntimeError("x" * 500), limit=40)
    assert len(long) == 40 and long.startswith("RuntimeError: xxx") and long.endswith("...")
