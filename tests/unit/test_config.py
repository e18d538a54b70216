import subprocess
import sys

import pytest
import yaml

from exporter import config
from exporter.config import ConfigError


def load(tmp_path=None, text=None, env=None, flags=None):
    path = None
    if text is not None:
        path = tmp_path / "exporter.yaml"
        path.write_text(text)
    return config.load(str(path) if path else None, env or {}, flags or {})


def test_embedded_defaults_cover_every_field():
    flat = config.flatten(config.default_document(), "defaults")
    assert set(flat) == set(config.field_paths())
    cfg = load()
    assert cfg.web.listen_address == ":9814"
    assert cfg.series.ttl == 300.0
    assert cfg.interfaces.exclude == ("lo",)


def test_file_then_environment_then_flags(tmp_path):
    text = "series:\n  ttl: 10m\n  max_per_metric: 50\nlog:\n  level: debug\n"
    cfg = load(tmp_path, text, env={"EBPF_NET_SERIES_TTL": "30s"},
               flags={"series.max_per_metric": "7"})
    assert cfg.series.ttl == 30.0          # environment over file
    assert cfg.series.max_per_metric == 7  # flag over file
    assert cfg.log.level == "debug"        # file over defaults


def test_lists_come_from_yaml_or_comma_separated_environment(tmp_path):
    cfg = load(tmp_path, "ports:\n  server: [40000, 40001]\n",
               env={"EBPF_NET_INTERFACES_INCLUDE": "veth.*, cali.*"})
    assert cfg.ports.server == (40000, 40001)
    assert cfg.interfaces.include == ("veth.*", "cali.*")


@pytest.mark.parametrize("text,message", [
    ("series:\n  ttl: soon\n", "series.ttl (from config file"),
    ("series:\n  max_per_metric: -1\n", "series.max_per_metric"),
    ("interfaces:\n  include: ['ok', '(']\n", "interfaces.include (from config file"),
    ("ports:\n  server: [70000]\n", "ports.server"),
    ("labels:\n  endpoint: [ip, colour]\n", "labels.endpoint"),
    ("web:\n  listen_address: 9814\n", "web.listen_address"),
    ("web:\n  telemetry_path: metrics\n", "web.telemetry_path"),
    ("collectors:\n  flows: maybe\n", "collectors.flows"),
    ("log:\n  format: xml\n", "log.format"),
    ("serie:\n  ttl: 5m\n", "unknown section 'serie'"),
    ("series:\n  tll: 5m\n", "unknown field 'series.tll'"),
    ("series: 5\n", "series: expected a mapping"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("series:\n  ttl: [\n", "invalid YAML"),
])
def test_errors_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_regex_errors_say_which_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"interfaces.include .*\[1\]: invalid regex '\('"):
        load(tmp_path, "interfaces:\n  include: ['ok', '(']\n")


def test_missing_file_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"config file /nonexistent\.yaml: No such file"):
        config.load("/nonexistent.yaml", {}, {})


def test_environment_errors_name_the_variable():
    with pytest.raises(ConfigError, match=r"log.level \(from EBPF_NET_LOG_LEVEL\)"):
        load(env={"EBPF_NET_LOG_LEVEL": "loud"})


def test_a_misspelt_environment_variable_is_an_error_with_a_hint():
    with pytest.raises(ConfigError, match="unknown environment variable EBPF_NET_SERIES_TLL "
                                          r"\(did you mean EBPF_NET_SERIES_TTL\?\)"):
        load(env={"EBPF_NET_SERIES_TLL": "5m"})
    assert load(env={"EBPF_NET_BPF_DIR": "/x", "OTHER": "1"}).series.ttl == 300


@pytest.mark.parametrize("text,items", [
    ("veth.*, cali.*", ["veth.*", "cali.*"]),
    ("veth.{1,3},lxc[0-9,a]+", ["veth.{1,3}", "lxc[0-9,a]+"]),   # commas inside brackets stay
    ('["a,b", "c"]', ["a,b", "c"]),                               # YAML flow list
    ("", []),
])
def test_environment_lists(text, items):
    assert config.split_list(text) == items


def test_regexes_with_commas_survive_the_environment():
    cfg = load(env={"EBPF_NET_INTERFACES_INCLUDE": "veth.{1,3}"})
    assert cfg.interfaces.include == ("veth.{1,3}",)


@pytest.mark.parametrize("text,message", [
    ("web:\n  telemetry_path: /healthz\n", "/healthz is served by the exporter itself"),
    ("maps:\n  flow_capacity: 100000000\n", "at most 16777216 entries"),
    ("ports:\n  ephemeral_floor: AUTO\n", "expected auto or a port number"),
])
def test_values_the_exporter_cannot_use(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_durations():
    assert config.parse_duration("250ms") == 0.25
    assert config.parse_duration("1h") == 3600
    assert config.parse_duration(5) == 5.0
    for bad in ("0s", "-1s", "5 minutes", True, None):
        with pytest.raises(ConfigError):
            config.parse_duration(bad)


def test_the_rtt_sample_interval_can_be_off_from_the_file_the_environment_or_a_flag(tmp_path):
    # YAML reads a bare off as false; quoted, it is the string
    for text in ("tcp:\n  rtt_sample_interval: off\n", "tcp:\n  rtt_sample_interval: 'off'\n",
                 "tcp:\n  rtt_sample_interval: 0\n"):
        assert load(tmp_path, text).tcp.rtt_sample_interval == 0.0, text
    assert load(env={"EBPF_NET_TCP_RTT_SAMPLE_INTERVAL": "off"}).tcp.rtt_sample_interval == 0.0
    assert load(flags={"tcp.rtt_sample_interval": "0"}).tcp.rtt_sample_interval == 0.0
    assert load(tmp_path, "tcp:\n  rtt_sample_interval: 250ms\n").tcp.rtt_sample_interval == 0.25
    with pytest.raises(ConfigError, match=r"tcp\.rtt_sample_interval.*a duration like 1s or "
                                          r"500ms, or off, got 'sometimes'"):
        load(tmp_path, "tcp:\n  rtt_sample_interval: sometimes\n")
    with pytest.raises(ConfigError, match="at most a year"):
        load(tmp_path, "tcp:\n  rtt_sample_interval: 9000h\n")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli_config_check_prints_the_effective_configuration(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("series:\n  ttl: 2m\n")
    result = cli("--config.file", str(path), "--interfaces", "veth.*", "--no-collector.tcp",
                 "--interfaces.attach", "CLSACT", "--config.check")
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["series"]["ttl"] == 120.0
    assert effective["interfaces"] == {"include": ["veth.*"], "exclude": ["lo"],
                                       "attach": "clsact"}
    assert effective["collectors"] == {"flows": True, "tcp": False, "dns": True, "http": True,
                                    "https": True, "drops": False, "bash": False}


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--series.ttl", "later", "--config.check"], "series.ttl (from --series.ttl)"),
    (["--web.listen-address", "nowhere", "--config.check"],
     "web.listen_address (from --web.listen-address)"),
    (["--config.file", "/nonexistent.yaml", "--config.check"], "No such file"),
    (["--interfaces.attach", "xdp", "--config.check"],
     "interfaces.attach (from --interfaces.attach): expected one of auto, tcx, clsact, got 'xdp'"),
])
def test_cli_mistakes_exit_non_zero_with_one_line(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_help_has_examples():
    result = cli("--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert "--web.listen-address" in result.stdout
