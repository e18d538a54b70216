from exporter import classifier, config


def flags(**overrides):
    return classifier.cflags(config.load(None, {}, overrides))


def test_every_part_is_compiled_only_when_its_collector_is_on():
    all_on = flags()
    assert {"-DWITH_FLOWS", "-DWITH_DNS", "-DWITH_HTTP"} <= set(all_on)
    assert "-DDNS_PORT(p)=((p)==53)" in all_on
    assert not any(f.startswith("-DHTTP_PORT") for f in all_on)   # every port by default
    assert "-DDNS_QUERY_NAMES" not in all_on and "-DHTTP_PATHS" not in all_on
    only_http = flags(**{"collectors.flows": False, "collectors.dns": False})
    assert "-DWITH_FLOWS" not in only_http and "-DWITH_DNS" not in only_http
    assert classifier.wanted(config.load(None, {}, {"collectors.flows": False,
                                                   "collectors.dns": False,
                                                   "collectors.http": False})) is False


def test_port_lists_and_opt_in_labels_become_defines():
    out = flags(**{"dns.ports": [53, 5353], "http.ports": [80, 8080],
                   "dns.query_names": ["*.svc.cluster.local"], "http.paths": ["/api/"]})
    assert "-DDNS_PORT(p)=((p)==53||(p)==5353)" in out
    assert "-DHTTP_PORT(p)=((p)==80||(p)==8080)" in out
    assert "-DDNS_QUERY_NAMES" in out and "-DHTTP_PATHS" in out
