"""Where /metrics listens: "::" (the default) is every IPv6 and IPv4 address; a host without IPv6
(a kernel without it, or a resolver that does not know "::") falls back to every IPv4 address instead
of failing the server's start. The missing IPv6 is simulated (this machine has it): the listener that
results is real and scraped."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from videogen_server import metrics as metrics_module
from videogen_server.metrics import Metrics


@pytest.mark.parametrize("failure", [OSError(97, "Address family not supported by protocol"),
                                     socket.gaierror(-9, "Address family for hostname not supported")])
def test_without_ipv6_metrics_listen_on_ipv4(monkeypatch, failure):
    real = metrics_module.start_http_server
    tried = []

    def no_ipv6(port, addr, registry):
        tried.append(addr)
        if ":" in addr:
            raise failure
        return real(port, addr=addr, registry=registry)

    monkeypatch.setattr(metrics_module, "start_http_server", no_ipv6)
    m = Metrics()
    try:
        port = m.serve(0, "[::]")
        assert tried == ["::", "0.0.0.0"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
    finally:
        m.close()


def test_a_taken_port_is_not_hidden_by_the_fallback():
    with socket.socket(socket.AF_INET6) as taken:
        try:
            taken.bind(("::", 0))
        except OSError:
            pytest.skip("no IPv6 on this machine")
        taken.listen()
        m = Metrics()
        with pytest.raises(OSError):
            m.serve(taken.getsockname()[1], "::")
        m.close()
