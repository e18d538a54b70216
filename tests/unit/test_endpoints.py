import ipaddress

import pytest

from exporter.naming.endpoints import EndpointLabels, PortFolder, address_text, ip_type


@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("fd00::1", "private"), ("fe80::1", "private"),
    ("224.0.0.251", "multicast"), ("ff02::fb", "multicast"), ("8.8.8.8", "public"),
    ("2606:4700::1111", "public"),
])
def test_ip_type(address, kind):
    assert ip_type(ipaddress.ip_address(address)) == kind


def test_address_text_reads_the_kernels_16_byte_fields():
    assert address_text(4, bytes([10, 0, 0, 1]) + b"\0" * 12) == "10.0.0.1"
    assert address_text(6, ipaddress.IPv6Address("fd00::2").packed) == "fd00::2"
    mapped = ipaddress.IPv6Address("::ffff:10.0.0.7").packed
    assert address_text(6, mapped) == "10.0.0.7"


def test_port_rule_folds_ephemeral_ports_and_keeps_server_ports():
    folder = PortFolder(ephemeral_floor=32768)
    assert folder.fold("10.0.0.1", 41000, "10.0.0.2", 80) == ("*", "80")
    assert folder.fold("10.0.0.2", 80, "10.0.0.1", 41000) == ("80", "*")
    assert folder.fold("10.0.0.1", 53, "10.0.0.2", 53) == ("53", "53")
    assert folder.fold("10.0.0.1", 0, "10.0.0.2", 0) == ("", "")


def test_configured_server_ports_above_the_floor_are_kept():
    folder = PortFolder(ephemeral_floor=32768, server_ports=[40000])
    assert folder.fold("10.0.0.1", 50000, "10.0.0.2", 40000) == ("*", "40000")


def test_a_server_learned_from_the_handshake_wins_over_the_port_rule():
    folder = PortFolder(ephemeral_floor=32768)
    # both ports look ephemeral; the handshake said 10.0.0.2:45000 is the server
    folder.learn_server("10.0.0.2", 45000)
    assert folder.fold("10.0.0.1", 50000, "10.0.0.2", 45000) == ("*", "45000")
    assert folder.fold("10.0.0.2", 45000, "10.0.0.1", 50000) == ("45000", "*")
    # a client that happens to use a low source port is folded once its server is known
    folder.learn_server("10.0.0.9", 8080)
    assert folder.fold("10.0.0.1", 1000, "10.0.0.9", 8080) == ("*", "8080")


def test_server_side_of_a_socket_whose_role_was_not_seen():
    folder = PortFolder(ephemeral_floor=32768)
    assert folder.server_is_remote("10.0.0.1", 41000, "10.0.0.2", 443)
    assert not folder.server_is_remote("10.0.0.2", 443, "10.0.0.1", 41000)
    assert folder.server_is_remote("10.0.0.1", 8080, "10.0.0.2", 80)   # lower port serves
    folder.learn_server("10.0.0.1", 50001)
    assert not folder.server_is_remote("10.0.0.1", 50001, "10.0.0.2", 50002)


def test_endpoint_labels_follow_the_configured_vocabulary():
    labels = EndpointLabels(["ip", "ip_type", "port"])
    assert labels.label_names("src") == ["src_ip", "src_ip_type", "src_port"]
    assert labels.label_names("src", with_port=False) == ["src_ip", "src_ip_type"]
    assert labels.values("src", "10.0.0.1", "*") == ("10.0.0.1", "private", "*")
    assert labels.values("dst", "8.8.8.8", None) == ("8.8.8.8", "public")
    only_type = EndpointLabels(["ip_type"])
    assert only_type.label_names("dst") == ["dst_ip_type"]
    assert only_type.values("dst", "8.8.8.8", "53") == ("public",)


def test_vectorised_folding_agrees_with_the_scalar_rule():
    import numpy as np

    from exporter.naming.endpoints import port_text

    rng = np.random.default_rng(7)
    texts = [f"10.0.0.{i}" for i in range(20)]
    folder = PortFolder(ephemeral_floor=32768, server_ports=[40000])
    ports = np.array([0, 22, 53, 80, 443, 8080, 32767, 32768, 40000, 45000, 50000, 60999])
    for _ in range(30):
        folder.learn_server(texts[rng.integers(20)], int(rng.choice(ports)))
    n = 5000
    src, dst = rng.integers(0, 20, n), rng.integers(0, 20, n)
    sport, dport = rng.choice(ports, n), rng.choice(ports, n)
    both_zero = rng.random(n) < 0.05
    sport[both_zero], dport[both_zero] = 0, 0
    s_code, d_code = folder.fold_codes(texts, src, sport.astype(np.uint16), dst,
                                       dport.astype(np.uint16))
    for i in range(n):
        expected = folder.fold(texts[src[i]], int(sport[i]), texts[dst[i]], int(dport[i]))
        assert (port_text(s_code[i]), port_text(d_code[i])) == expected, i


def test_distinct_addresses_with_both_families():
    import numpy as np

    from exporter.naming.endpoints import distinct_addresses

    def raw(text):
        ip = ipaddress.ip_address(text)
        return np.frombuffer(ip.packed.ljust(16, b"\0"), dtype=np.uint8)

    # one row per packet: its family applies to both of its addresses
    rows = [("10.0.0.1", "10.0.0.9", 4), ("fd00::1", "fd00::9", 6),
            ("10.0.0.1", "10.0.0.9", 4), ("fd00::2", "fd00::1", 6)]
    src = np.stack([raw(r[0]) for r in rows])
    dst = np.stack([raw(r[1]) for r in rows])
    family = np.array([r[2] for r in rows], dtype=np.uint8)
    texts, (s, d) = distinct_addresses(family, src, dst)
    assert [texts[i] for i in s] == [r[0] for r in rows]
    assert [texts[i] for i in d] == [r[1] for r in rows]
    assert sorted(texts) == sorted({"10.0.0.1", "10.0.0.9", "fd00::1", "fd00::9", "fd00::2"})


def test_unique_rows_matches_a_plain_reference():
    import numpy as np

    from exporter.naming.endpoints import unique_rows

    rng = np.random.default_rng(3)
    a, b, c = rng.integers(0, 5, 2000), rng.integers(-2, 3, 2000), rng.integers(0, 4, 2000)
    firsts, inverse = unique_rows(a, b, c)
    rows = list(zip(a.tolist(), b.tolist(), c.tolist(), strict=True))
    assert len(firsts) == len(set(rows))
    for i, row in enumerate(rows):
        assert rows[firsts[inverse[i]]] == row
    assert unique_rows(np.array([], dtype=np.int64))[0].size == 0


# small values take the sort of (value, row) pairs packed in one integer; values too wide
# for that, or negative, np.unique
@pytest.mark.parametrize("low, high", [(0, 50), (1 << 50, (1 << 50) + 40), (-20, 30)])
def test_grouped_matches_a_plain_reference(low: int, high: int):
    import numpy as np

    from exporter.naming.endpoints import grouped

    rng = np.random.default_rng(4)
    values = rng.integers(low, high, 3000)
    rows, inverse = grouped(values)
    distinct = sorted(set(values.tolist()))
    assert [values[r] for r in rows] == distinct          # one row of each, in sorted order
    assert [distinct[i] for i in inverse] == values.tolist()
    assert grouped(np.array([], dtype=np.int64))[0].size == 0
    assert grouped(np.array([7], dtype=np.int64))[1].tolist() == [0]


def test_ranks_match_a_plain_reference():
    import numpy as np

    from exporter.naming.endpoints import ranks

    values = np.random.default_rng(4).integers(0, 50, 3000)
    distinct = sorted(set(values.tolist()))
    ranked, count = ranks(values, 64)
    assert count == len(distinct)
    assert ranked.tolist() == [distinct.index(v) for v in values.tolist()]


def test_known_servers_found_the_same_way_with_many_clients_or_many_servers():
    import numpy as np

    rng = np.random.default_rng(11)
    texts = [f"10.1.{i // 256}.{i % 256}" for i in range(600)]
    address = rng.integers(0, 600, 4000)
    port = rng.integers(1, 3000, 4000)
    few = PortFolder(ephemeral_floor=32768)     # fewer servers than pairs: servers looked up
    many = PortFolder(ephemeral_floor=32768)    # more servers than pairs: pairs looked up
    for i in range(0, 4000, 7):
        few.learn_server(texts[address[i]], int(port[i]))
        many.learn_server(texts[address[i]], int(port[i]))
    for i in range(20000):
        many.learn_server(f"192.168.{i // 256}.{i % 256}", 80)
    expected = np.array([few.is_known_server(texts[a], int(p))
                         for a, p in zip(address, port, strict=True)])
    assert expected.sum() >= 4000 // 7
    for folder in (few, many):
        codes = folder._server_codes(texts, len(address))
        assert (codes is None) == (folder is many)
        assert (folder._known(texts, address, port, codes) == expected).all()
