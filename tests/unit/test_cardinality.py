from exporter.serving.cardinality import SeriesStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def store(max_series=3, ttl=300.0, clock=None):
    return SeriesStore("m_total", ["src_ip", "dst_ip", "protocol"], ["src_ip", "dst_ip"],
                       max_series, ttl, clock=clock or Clock())


def test_totals_only_grow_across_adds():
    s = store()
    s.add(("a", "b", "tcp"), (5,))
    s.add(("a", "b", "tcp"), (7,))
    assert s.get(("a", "b", "tcp")) == [12.0]


def test_series_past_the_cap_fold_into_overflow_and_totals_stay_exact():
    s = store(max_series=2)
    s.add(("a", "b", "tcp"), (1,))
    s.add(("a", "c", "tcp"), (2,))
    s.add(("a", "d", "tcp"), (4,))      # over the cap
    s.add(("a", "e", "udp"), (8,))      # over the cap, another protocol
    s.add(("a", "b", "tcp"), (16,))     # existing series still counts
    assert s.get(("overflow", "overflow", "tcp")) == [4.0]
    assert s.get(("overflow", "overflow", "udp")) == [8.0]
    assert s.get(("a", "d", "tcp")) is None
    assert s.overflowed_series_total == 2
    assert sum(v[0] for _, v in s.items()) == 1 + 2 + 4 + 8 + 16


def test_add_counts_is_add_for_many_series_with_the_cap_and_the_clock():
    clock = Clock()
    s = store(max_series=2, ttl=300, clock=clock)
    s.add(("a", "b", "tcp"), (1,))
    clock.now += 200
    s.add_counts([("a", "b", "tcp"), ("a", "c", "tcp"), ("a", "d", "tcp")], [2.0, 4.0, 8.0])
    assert s.get(("a", "b", "tcp")) == [3.0]
    assert s.get(("a", "c", "tcp")) == [4.0]
    assert s.get(("overflow", "overflow", "tcp")) == [8.0]     # past the cap
    assert s.overflowed_series_total == 1
    clock.now += 200        # 400 s after the first add, 200 s after add_counts
    assert s.expire() == 0  # add_counts stamped the existing series too


def test_add_counts_refuses_a_histogram_store():
    import pytest

    wide = SeriesStore("h", ["a"], [], 10, 300, width=3)
    with pytest.raises(ValueError, match="width 1"):
        wide.add_counts([("x",)], [1.0])


def test_idle_series_expire_after_the_ttl_and_busy_ones_stay():
    clock = Clock()
    s = store(ttl=300, clock=clock)
    s.add(("a", "b", "tcp"), (1,))
    s.add(("a", "c", "tcp"), (1,))
    clock.now += 200
    s.add(("a", "c", "tcp"), (1,))
    clock.now += 101                    # a-b idle 301 s, a-c idle 101 s
    assert s.expire() == 1
    assert s.get(("a", "b", "tcp")) is None
    assert s.get(("a", "c", "tcp")) == [2.0]


def test_expiry_frees_room_under_the_cap():
    clock = Clock()
    s = store(max_series=1, ttl=10, clock=clock)
    s.add(("a", "b", "tcp"), (1,))
    clock.now += 11
    s.expire()
    s.add(("a", "c", "tcp"), (1,))
    assert s.get(("a", "c", "tcp")) == [1.0]
    assert s.overflowed_series_total == 0


def test_keep_predicate_protects_idle_series():
    clock = Clock()
    s = store(ttl=10, clock=clock)
    s.add(("a", "b", "tcp"), (1,))
    clock.now += 60
    assert s.expire(keep=lambda labels: labels[1] == "b") == 0
    assert s.get(("a", "b", "tcp")) == [1.0]


def test_histogram_width_series_add_elementwise():
    s = SeriesStore("h", ["x"], [], 10, 60, width=3)
    s.add(("x",), (1, 0, 5))
    s.add(("x",), (0, 2, 5))
    assert s.get(("x",)) == [1.0, 2.0, 10.0]


def test_a_store_reuses_the_label_text_of_its_sibling():
    first = SeriesStore("a_total", ["x", "y"], ["x"], 10, 60)
    second = SeriesStore("b_total", ["x", "y"], ["x"], 10, 60, text_from=first)
    first.add(("1", 'q"'), (1.0,))
    second.add(("1", 'q"'), (2.0,))
    second.add(("2", "z"), (3.0,))          # not in the sibling: rendered here
    (_, text_a, _), = first.rows()
    (_, text_b, values), (_, text_c, _) = second.rows()
    assert text_b is text_a and text_a == '{x="1",y="q\\""}' and values == [2.0]
    assert text_c == '{x="2",y="z"}'
