from exporter.serving import histogram


def test_slots_are_ceil_log2_with_zero_and_one_in_slot_zero():
    assert [histogram.slot_of(v) for v in (0, 1, 2, 3, 4, 5, 8, 9, 1024, 1025)] == \
        [0, 0, 1, 2, 2, 3, 3, 4, 10, 11]


def test_values_past_the_last_bound_land_in_the_inf_slot():
    assert histogram.slot_of((1 << 25) + 1) == histogram.INF_SLOT
    assert histogram.slot_of(1 << 40) == histogram.INF_SLOT
    assert histogram.slot_of(1 << 25) == histogram.INF_SLOT - 1


def test_every_value_is_in_the_first_bucket_whose_bound_it_does_not_exceed():
    for microseconds in (0, 1, 2, 3, 4, 5, 1000, 1024, 123456, 1 << 25):
        slot = histogram.slot_of(microseconds)
        assert microseconds * 1e-6 <= histogram.UPPER_BOUNDS_SECONDS[slot]
        if slot:
            assert microseconds * 1e-6 > histogram.UPPER_BOUNDS_SECONDS[slot - 1]


def test_buckets_are_cumulative_and_end_with_inf():
    series = [0.0] * histogram.WIDTH
    series[1] = 1        # le 2us
    series[4] = 2        # le 16us
    series[histogram.INF_SLOT] = 4
    series[histogram.SUM_INDEX] = 1_500_000    # microseconds
    buckets, total = histogram.buckets(series)
    assert buckets[0] == ("1e-06", 0)
    assert buckets[1] == ("2e-06", 1)
    assert buckets[3] == ("8e-06", 1)
    assert buckets[4] == ("1.6e-05", 3)
    assert buckets[-2][1] == 3
    assert buckets[-1] == ("+Inf", 7)
    assert len(buckets) == histogram.SLOTS
    assert total == 1.5


def test_kernel_slot_numbers_map_to_series_positions():
    assert histogram.index_of(0) == 0
    assert histogram.index_of(histogram.INF_SLOT) == histogram.INF_SLOT
    assert histogram.index_of(histogram.SUM_SLOT) == histogram.SUM_INDEX
    assert histogram.index_of(40) is None
