"""videogen-server's command line: flags become a typed ServerConfig, bad values exit 2 naming the flag."""
from __future__ import annotations

import pytest

from videogen_server.cli import _parser, config_from_args


def test_log_level_any_case_and_bad_ones_refused(tmp_path, capsys):
    args = _parser().parse_args(["serve", "--model-repository", str(tmp_path), "--log-level", "debug"])
    assert config_from_args(args, {}).log_level == "DEBUG"
    assert config_from_args(_parser().parse_args(["serve", "--model-repository", str(tmp_path)]), {}).log_level == "INFO"
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["serve", "--model-repository", str(tmp_path), "--log-level", "loud"])
    assert exit_.value.code == 2
    assert "--log-level" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve", "--model-repository", "."], ["make-tiny-model", "repo"]])
def test_a_client_only_install_says_what_to_install(command, monkeypatch, capsys):
    """`pip install videogen` (the client) installs the videogen-server command too: without the server
    extra it ended in a ModuleNotFoundError traceback (numpy, torch)."""
    import sys

    from videogen_server.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # importlib's "not installed" for find_spec
    monkeypatch.setitem(sys.modules, "av", None)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "diffusers, av missing" in err and "pip install 'videogen[server]'" in err


def test_listeners_need_their_own_ports(tmp_path):
    from videogen_server.config import ServerConfig

    with pytest.raises(ValueError, match="--health-port 8002 is also --metrics-port"):
        ServerConfig(model_repositories=(tmp_path,), health_port=8002)
    with pytest.raises(ValueError, match="--metrics-port 8001 is also --port"):
        ServerConfig(model_repositories=(tmp_path,), metrics_port=8001)
    ServerConfig(model_repositories=(tmp_path,), port=0, metrics_port=0, health_port=0)  # each picks a free one


def test_tracing_flags_and_the_standard_service_name_variable(tmp_path):
    base = ["serve", "--model-repository", str(tmp_path), "--otlp-endpoint", "http://collector:4317"]
    config = config_from_args(_parser().parse_args(base), {})
    assert (config.otlp_endpoint, config.otlp_service_name, config.trace_sample_ratio) == \
        ("http://collector:4317", "videogen", 1.0)
    # OTEL_SERVICE_NAME names the service unless the flag does
    assert config_from_args(_parser().parse_args(base), {"OTEL_SERVICE_NAME": "vg-eu"}).otlp_service_name == "vg-eu"
    flagged = _parser().parse_args(base + ["--otlp-service-name", "vg-us", "--trace-sample-ratio", "0.1"])
    config = config_from_args(flagged, {"OTEL_SERVICE_NAME": "vg-eu"})
    assert (config.otlp_service_name, config.trace_sample_ratio) == ("vg-us", 0.1)


def test_keepalive_flags_become_the_grpc_servers_ping_options(tmp_path):
    from videogen_server.config import ServerConfig
    from videogen_server.transport.server import channel_options

    base = ["serve", "--model-repository", str(tmp_path)]
    options = dict(channel_options(config_from_args(_parser().parse_args(base), {})))
    # by default a silent caller is pinged after 60 s and its connection closed 60 s later: the answer's
    # wait is the ping timeout, which also bounds flow control's pings (gRPC's own 60 s kept)
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"],
            options["grpc.http2.ping_timeout_ms"]) == (60000, 60000, 60000)
    # the callers' own pings stay allowed every 10 s (the SDK's keepalive is at least 15 s)
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10000
    flagged = _parser().parse_args(base + ["--keepalive-seconds", "5", "--keepalive-timeout-seconds", "2.5"])
    options = dict(channel_options(config_from_args(flagged, {})))
    assert (options["grpc.keepalive_time_ms"], options["grpc.http2.ping_timeout_ms"]) == (5000, 2500)
    off = dict(channel_options(config_from_args(_parser().parse_args(base + ["--keepalive-seconds", "0"]), {})))
    assert "grpc.keepalive_time_ms" not in off and "grpc.http2.ping_timeout_ms" not in off
    # negative, below 1 s (gRPC would ping every millisecond), beyond gRPC's int milliseconds, not a number
    for bad in (-1, 0.5, 3e6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--keepalive-seconds"):
            ServerConfig(model_repositories=(tmp_path,), keepalive_seconds=bad)
    for bad in (0, 0.5, 3e6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--keepalive-timeout-seconds"):
            ServerConfig(model_repositories=(tmp_path,), keepalive_timeout_seconds=bad)


@pytest.mark.parametrize("flag, default", [("--stream-send-timeout-seconds", 120.0),
                                           ("--instance-stall-seconds", 600.0)])
def test_the_seconds_flags_that_0_turns_off_reach_the_config(tmp_path, flag, default):
    from videogen_server.config import ServerConfig

    field = flag[2:].replace("-", "_")
    base = ["serve", "--model-repository", str(tmp_path)]
    assert getattr(config_from_args(_parser().parse_args(base), {}), field) == default
    for value, expected in (("2.5", 2.5), ("0", 0.0)):  # 0: never
        args = _parser().parse_args(base + [flag, value])
        assert getattr(config_from_args(args, {}), field) == expected
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=flag):
            ServerConfig(model_repositories=(tmp_path,), **{field: bad})


def test_the_concurrent_requests_flag_reaches_the_config(tmp_path):
    from videogen_server.config import ServerConfig

    base = ["serve", "--model-repository", str(tmp_path)]
    assert config_from_args(_parser().parse_args(base), {}).max_concurrent_requests == 128
    for value in (1, 0, 1000):
        args = _parser().parse_args(base + ["--max-concurrent-requests", str(value)])
        assert config_from_args(args, {}).max_concurrent_requests == value
    with pytest.raises(ValueError, match="--max-concurrent-requests"):
        ServerConfig(model_repositories=(tmp_path,), max_concurrent_requests=-1)


def test_the_strict_readiness_flag_reaches_the_config(tmp_path, capsys):
    base = ["serve", "--model-repository", str(tmp_path)]
    assert config_from_args(_parser().parse_args(base), {}).strict_readiness is True  # Triton's default
    for value, expected in (("false", False), ("True", True), ("0", False), ("on", True)):
        assert config_from_args(_parser().parse_args(base + ["--strict-readiness", value]), {}).strict_readiness is expected
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(base + ["--strict-readiness", "maybe"])
    assert exit_.value.code == 2 and "--strict-readiness" in capsys.readouterr().err


def test_the_connection_flags_reach_the_config(tmp_path):
    base = ["serve", "--model-repository", str(tmp_path)]
    config = config_from_args(_parser().parse_args(base), {})
    assert config.max_connections is None and config.handshake_timeout_seconds == 20.0
    args = _parser().parse_args(base + ["--max-connections", "100", "--handshake-timeout-seconds", "5"])
    config = config_from_args(args, {})
    assert config.connection_limit() == 100 and config.handshake_timeout_seconds == 5.0


def test_the_request_read_timeout_flag_reaches_the_config(tmp_path):
    from videogen_server.config import ServerConfig

    base = ["serve", "--model-repository", str(tmp_path)]
    assert config_from_args(_parser().parse_args(base), {}).request_read_timeout_seconds == 120.0
    args = _parser().parse_args(base + ["--request-read-timeout-seconds", "0"])
    assert config_from_args(args, {}).request_read_timeout_seconds == 0.0
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--request-read-timeout-seconds"):
            ServerConfig(model_repositories=(tmp_path,), request_read_timeout_seconds=bad)


def test_every_flag_says_what_it_does_and_its_default_in_help():
    """`serve --help` listed --repository-poll-seconds, --unload-timeout-seconds, --log-format and
    --log-level bare, and gave no default for others README's table has (user review)."""
    import argparse

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("serve", "compile-artifacts", "make-tiny-model"):
        for action in subparsers.choices[command]._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, (command, action.option_strings)
            takes_value = action.nargs != 0 and not isinstance(action, argparse._AppendAction)
            if takes_value and action.default not in (None, argparse.SUPPRESS):
                assert "default" in action.help, (command, action.option_strings, action.help)


@pytest.mark.parametrize("flags", [
    ["--port", "70000"], ["--metrics-port", "-2"], ["--health-port", "65536"],
    ["--repository-poll-seconds", "0", "--model-control-mode", "poll"],
    ["--repository-poll-seconds", "-1", "--model-control-mode", "poll"],
    ["--max-queue-size", "0"], ["--max-queue-size", "-1"], ["--media-threads", "0"], ["--cpu-threads", "-1"],
    ["--max-request-bytes", "-1"], ["--max-request-bytes", "3000000000"],
    ["--max-connection-age-seconds", "3000000"], ["--max-connection-age-grace-seconds", "-1"],
    ["--unload-timeout-seconds", "-1"], ["--drain-grace-seconds", "-1"],
])
def test_out_of_range_flags_are_refused_naming_the_flag(tmp_path, flags):
    """gRPC listened on 70000 % 65536 = 4464, took --max-request-bytes -1 as no limit, failed the start
    with an OverflowError past a C int; a poll interval of 0 scanned the repositories in a busy loop; a
    queue of 0 refused every request (repository review)."""
    args = _parser().parse_args(["serve", "--model-repository", str(tmp_path), *flags])
    with pytest.raises(ValueError, match=flags[0]):
        config_from_args(args, {})


def test_the_edges_of_the_ranges_are_taken(tmp_path):
    from videogen_server.config import MAX_GRPC_SECONDS, ServerConfig

    ServerConfig(model_repositories=(tmp_path,), port=65535, metrics_port=-1, health_port=0, max_request_bytes=2**31 - 1,
                 max_connection_age_seconds=MAX_GRPC_SECONDS, max_connection_age_grace_seconds=0, max_queue_size=1,
                 media_threads=1, cpu_threads=0, drain_grace_seconds=0, unload_timeout_seconds=0,
                 repository_poll_seconds=0.05)


def test_compile_artifacts_says_a_flag_out_of_range_as_serve_does(tmp_path, capsys):
    from videogen_server.cli import main

    assert main(["compile-artifacts", "--model-repository", str(tmp_path), "--model", "m", "--cpu-threads", "-1"]) == 2
    assert "videogen-server: error: --cpu-threads: -1" in capsys.readouterr().err
