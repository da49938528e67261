"""TLS, mutual TLS and bearer tokens on the gRPC port, with the SDK as a user would call it."""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen_client import TokenFile, UnauthenticatedError, UnavailableError, VideoGenClient, VideoGenError

from ..helpers import ServerThread, metric_value, sample_png


def _pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, *, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem, key, crt):
        (tmp / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (tmp / f"{stem}.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", ca_key, cert("videogen test CA", ca_key, "videogen test CA", ca_key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, cert("localhost", server_key, "videogen test CA", ca_key,
                                     san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                                     usage=ExtendedKeyUsageOID.SERVER_AUTH))
    dns_key = ec.generate_private_key(ec.SECP256R1())  # names the host only, as most certificates do
    write("server-dns", dns_key, cert("localhost", dns_key, "videogen test CA", ca_key,
                                      san=[x509.DNSName("localhost")], usage=ExtendedKeyUsageOID.SERVER_AUTH))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, cert("client", client_key, "videogen test CA", ca_key,
                                     usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return {n: tmp / n for n in ("ca.crt", "server.crt", "server.key", "server-dns.crt", "server-dns.key",
                                 "client.crt", "client.key")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _pki(tmp_path_factory.mktemp("pki"))


def _run(client: VideoGenClient):
    return client.run(sample_png(), model="svd-tiny", num_frames=1, num_inference_steps=1, stream_video=False)


@pytest.fixture
def repo(tmp_path, tiny_model_source):
    import shutil

    shutil.copytree(tiny_model_source, tmp_path / "repo" / "svd-tiny")
    return tmp_path / "repo"


def test_tls(repo, pki):
    with ServerThread(repo, tls_cert=pki["server.crt"], tls_key=pki["server.key"]) as server:
        ca = pki["ca.crt"].read_bytes()
        with VideoGenClient(server.target, secure=True, root_certificates=ca) as client:
            assert _run(client).summary.num_frames == 1
        with VideoGenClient(server.target) as plaintext:  # a plaintext client cannot talk to a TLS port
            with pytest.raises(UnavailableError):
                plaintext.list_models(timeout=5)


def test_tls_to_a_list_of_host_names(repo, pki):
    """Several HOST:PORT become one address list: TLS must still check the certificate against the host
    name given (a certificate naming only the host failed hostname verification before)."""
    with ServerThread(repo, tls_cert=pki["server-dns.crt"], tls_key=pki["server-dns.key"]) as server:
        ca = pki["ca.crt"].read_bytes()
        port = server.target.rsplit(":", 1)[1]
        for target in ([f"localhost:{port}", f"localhost:{port}"], f"localhost:{port},localhost:{port}"):
            with VideoGenClient(target, secure=True, root_certificates=ca) as client:
                assert client.target.startswith(("ipv4:", "ipv6:"))
                assert _run(client).summary.num_frames == 1
        for mixed in ([f"localhost:{port}", f"127.0.0.1:{port}"], [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]):
            with pytest.raises(ValueError, match="one host name"):  # no certificate names an address list
                VideoGenClient(mixed, secure=True, root_certificates=ca)


def test_tls_files_that_cannot_serve_are_refused_naming_the_flag(tmp_path, pki):
    """A key of another certificate (or the two swapped) came out of gRPC as "cannot bind the gRPC port",
    after OpenSSL's "Invalid private key" in the log (repository review): refused at start, named."""
    from videogen_server.config import ServerConfig

    for cert, key, says in (("server.crt", "client.key", "the key is not the certificate's"),
                            ("server.key", "server.crt", "--tls-cert "),  # swapped: the first file is named
                            ("server.crt", "missing.key", "--tls-key ")):
        with pytest.raises(ValueError, match="--tls-") as err:
            ServerConfig(model_repositories=(tmp_path,), tls_cert=pki[cert] if cert in pki else tmp_path / cert,
                         tls_key=pki[key] if key in pki else tmp_path / key)
        assert says in str(err.value), str(err.value)
    assert "no PEM certificate" in str(err.value) or "No such file" in str(err.value)
    with pytest.raises(ValueError, match="--tls-client-ca .*no PEM certificate"):
        ServerConfig(model_repositories=(tmp_path,), tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                     tls_client_ca=pki["server.key"])
    # what OpenSSL reads and gRPC's BoringSSL does not serve: the bind failed ("cannot bind the gRPC port"),
    # and a reload to it was reported loaded while the old certificate went on serving (review)
    from cryptography.hazmat.primitives.asymmetric import dsa, ec

    for kind, key in (("dsa", dsa.generate_private_key(2048)), ("secp256k1", ec.generate_private_key(ec.SECP256K1()))):
        cert, key_file = _self_signed(tmp_path, kind, key)
        with pytest.raises(ValueError, match=f"--tls-cert {cert} / --tls-key {key_file}: gRPC cannot serve them"):
            ServerConfig(model_repositories=(tmp_path,), tls_cert=cert, tls_key=key_file)
    ServerConfig(model_repositories=(tmp_path,), tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                 tls_client_ca=pki["ca.crt"])
    # a key OpenSSL's default security level calls too small, which gRPC (BoringSSL) serves: not refused
    from cryptography.hazmat.primitives.asymmetric import rsa

    cert, key_file = _self_signed(tmp_path, "small", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    ServerConfig(model_repositories=(tmp_path,), tls_cert=cert, tls_key=key_file)


def _not_after(cert: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def _self_signed(folder: Path, stem: str, key) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return folder / f"{stem}.crt", folder / f"{stem}.key"


def test_mutual_tls(repo, pki):
    with ServerThread(repo, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                      tls_client_ca=pki["ca.crt"], health_port=0, auth_tokens=("tok",)) as server:
        # Kubernetes' grpc probes speak neither TLS nor client certificates: the health-only plaintext
        # port answers them (the same statuses and token rules), and serves nothing else
        plain = grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}")
        health = health_pb2_grpc.HealthStub(plain)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        for token in ((), (("authorization", "Bearer tok"),)):  # a model's: never here, where a token is in clear
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/svd-tiny"), metadata=token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "gRPC port" in refused.value.details()
            # List answers the server's own names, never a model's (an AttributeError's text, UNKNOWN, before)
            listed = health.List(health_pb2.HealthListRequest(), metadata=token, timeout=10)
            assert sorted(listed.statuses) == ["", "inference.GRPCInferenceService", "videogen.v1.VideoGen"]
        # the port is the server's alone: a second server cannot bind it too (gRPC's SO_REUSEPORT would let it
        # share the probes, and the main port's callers, silently)
        for taken in ({"health_port": server.server.health_port}, {"port": server.port}):
            with pytest.raises(OSError, match=f"cannot bind the (health|gRPC) port .*:{next(iter(taken.values()))}"):
                ServerThread(repo, **taken).start()
        with VideoGenClient(f"127.0.0.1:{server.server.health_port}", token="tok", retry=False) as wrong_port:
            with pytest.raises(VideoGenError) as other:
                wrong_port.list_models(timeout=5)
        assert other.value.code == grpc.StatusCode.UNIMPLEMENTED
        plain.close()
        ca = pki["ca.crt"].read_bytes()
        with VideoGenClient(server.target, secure=True, root_certificates=ca, token="tok",
                            private_key=pki["client.key"].read_bytes(),
                            certificate_chain=pki["client.crt"].read_bytes()) as client:
            assert _run(client).summary.num_frames == 1
        with VideoGenClient(server.target, secure=True, root_certificates=ca) as anonymous:
            with pytest.raises(UnavailableError):  # the handshake fails without a client certificate
                anonymous.list_models(timeout=5)


def test_bearer_tokens(repo, caplog):
    with ServerThread(repo, auth_tokens=("tok-one", "tok-two")) as server, \
            caplog.at_level("WARNING", logger="videogen_server.transport.auth"):
        assert server.metric("videogen_auth_failures_total", method="/videogen.v1.VideoGen/Generate") == 0
        for token in (None, "wrong", "tok-on", "tok-one-extra"):
            with VideoGenClient(server.target, token=token, retry=False) as client:
                with pytest.raises(UnauthenticatedError):
                    _run(client)
                with pytest.raises(UnauthenticatedError):
                    client.list_models()
        # counted, and said once a minute (a rotation gone wrong was in neither: observability review); the
        # server's own health, answered without a token (probes, the SDK's client-side health checking), is not
        open_health = health_pb2_grpc.HealthStub(server.channel())
        assert open_health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert server.metric("videogen_auth_failures_total", method="/videogen.v1.VideoGen/Generate") == 4
        assert server.metric("videogen_auth_failures_total", method="/videogen.v1.VideoGen/ListModels") == 4
        assert server.metric("videogen_auth_failures_total", method="/grpc.health.v1.Health/Check") == 0
        [warning] = [r.getMessage() for r in caplog.records if "refused without a valid bearer token" in r.getMessage()]
        assert warning.startswith("1 calls refused") and "wrong" not in warning and "tok-" not in warning
        for token in ("tok-one", "tok-two"):
            with VideoGenClient(server.target, token=token) as client:
                assert _run(client).summary.num_frames == 1
        # read from a file, a token keeps its newline: gRPC refused it as an INTERNAL "Invalid metadata"
        with VideoGenClient(server.target, token="tok-one\n") as client:
            assert client.list_models()[0].name == "svd-tiny"
        with pytest.raises(ValueError, match="token"):
            VideoGenClient(server.target, token="tok one")
        # probes carry no token: the server's own health stays open ...
        channel = grpc.insecure_channel(server.target)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "videogen.v1.VideoGen", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving, service
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == serving
        watch.cancel()
        # ... a model's needs a token, whether the model exists or not (no guessing names without one)
        for service in ("videogen.v1.VideoGen/svd-tiny", "videogen.v1.VideoGen/nope", "x"):
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(health_pb2.HealthCheckRequest(service=service))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, service
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(service=service)))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, service
        # List without a token: the server's own names only (it read `request.service`, which List's
        # request has not: UNKNOWN with an AttributeError's text and a traceback in the log); with one, all
        own = ["", "inference.GRPCInferenceService", "videogen.v1.VideoGen"]
        assert sorted(health.List(health_pb2.HealthListRequest(), timeout=10).statuses) == own
        listed = health.List(health_pb2.HealthListRequest(), metadata=(("authorization", "Bearer tok-one"),), timeout=10)
        assert sorted(listed.statuses) == [*own, "videogen.v1.VideoGen/svd-tiny"]
        assert listed.statuses["videogen.v1.VideoGen/svd-tiny"].status == serving
        assert server.metric("videogen_auth_failures_total", method="/grpc.health.v1.Health/List") == 0
        # refused health names are counted: Check and Watch, 3 names each
        assert server.metric("videogen_auth_failures_total", method="/grpc.health.v1.Health/Check") == 3
        assert server.metric("videogen_auth_failures_total", method="/grpc.health.v1.Health/Watch") == 3
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/svd-tiny"),
                         metadata=(("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", "Bearer tok-two"),)
        assert health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/svd-tiny"),
                            metadata=auth).status == serving
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/nope"), metadata=auth)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
        # the CLI reads a token from a file (a token on the command line is visible in the process list)
        token_file = repo.parent / "token"
        for text, status in (("# the CLI's token\n\ntok-two\n", 0), ("wrong\n", 1), ("# none\n", 2)):
            token_file.write_text(text)
            proc = subprocess.run([sys.executable, "-m", "videogen_client.cli", "models", "--target", server.target,
                                   "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == status, (text, proc.stderr)
            assert ("svd-tiny" in proc.stdout) if status == 0 else (
                "UNAUTHENTICATED" in proc.stderr if status == 1 else "no token" in proc.stderr), proc.stderr
        # the SDK's client-side health checking (its channel watches videogen.v1.VideoGen, without a token)
        with VideoGenClient(server.target, token="tok-one", health_check=True) as client:
            assert _run(client).summary.num_frames == 1
        # nothing reached the engine without a token
        assert server.metric("videogen_requests_total", code="UNAUTHENTICATED") == 0
        assert server.metric("videogen_requests_total", outcome="success") == 3


def test_a_refused_call_is_not_parsed():
    """The handler that refuses a call without a token neither parses its message (an unauthenticated
    caller made the server build protobuf objects of tens of MB per call) nor reads it: of the
    streaming-request shape, it ends the call before the message arrives (its memory: test_concurrency_limit)."""
    from videogen.v1 import videogen_pb2 as pb

    from videogen_server.transport.auth import _denied_handler

    handler = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()),
                                                   request_deserializer=pb.GenerateRequest.FromString,
                                                   response_serializer=pb.GenerateResponse.SerializeToString)
    denied = _denied_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "no")
    assert denied.request_deserializer is None and denied.stream_stream is not None
    assert denied.response_serializer is handler.response_serializer


def test_cli_reads_tokens_from_file_and_environment(tmp_path):
    from videogen_server.cli import _parser, config_from_args
    from videogen_server.config import read_token_file

    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nfile-token\n\n")
    args = _parser().parse_args(["serve", "--model-repository", str(tmp_path), "--auth-token-file", str(tokens)])
    config = config_from_args(args, {"VIDEOGEN_AUTH_TOKENS": "env-a, env-b"})
    assert config.auth_tokens == ("env-a", "env-b") and config.auth_token_file == tokens and config.authenticates
    assert read_token_file(tokens) == ("file-token",)
    assert config.credentials_reload_seconds == 10.0
    assert not config.restricts_model_control
    control = _parser().parse_args(["serve", "--model-repository", str(tmp_path), "--model-control-mode", "explicit",
                                    "--model-control-token-file", str(tokens)])
    config = config_from_args(control, {"VIDEOGEN_MODEL_CONTROL_TOKENS": "ops-a,ops-b"})
    assert config.model_control_tokens == ("ops-a", "ops-b") and config.model_control_token_file == tokens
    assert config.restricts_model_control and not config.authenticates
    with pytest.raises(ValueError, match="VIDEOGEN_MODEL_CONTROL_TOKENS: .*printable ASCII"):
        config_from_args(control, {"VIDEOGEN_MODEL_CONTROL_TOKENS": "a b"})
    # a file saved with a byte-order mark (a Windows editor) and CRLF: the first token is the token (it
    # kept U+FEFF in front, and no client could send it: repository review), the comment a comment
    tokens.write_bytes("\ufeff# tokens\r\ntok-one\r\ntok-two\r\n".encode())
    assert read_token_file(config_from_args(args, {}).auth_token_file) == ("tok-one", "tok-two")
    # anything gRPC metadata cannot carry is refused at start, not a token that can never match
    tokens.write_text("caf\u00e9\n")
    with pytest.raises(ValueError, match="--auth-token-file .*printable ASCII"):
        config_from_args(args, {})
    with pytest.raises(ValueError, match="VIDEOGEN_AUTH_TOKENS: .*printable ASCII"):
        config_from_args(_parser().parse_args(["serve", "--model-repository", str(tmp_path)]),
                         {"VIDEOGEN_AUTH_TOKENS": "a\u00e9"})
    # a file without a token started a server that asked no caller for one: refused, as one that cannot be read
    for text in ("", "# tokens go here\n\n"):
        tokens.write_text(text)
        with pytest.raises(ValueError, match=f"--auth-token-file {tokens}: no token in it"):
            config_from_args(args, {})
    tokens.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="--auth-token-file .*utf-8"):
        config_from_args(args, {})
    with pytest.raises(ValueError, match="--auth-token-file .*No such file"):
        config_from_args(_parser().parse_args(["serve", "--model-repository", str(tmp_path),
                                               "--auth-token-file", str(tmp_path / "none")]), {})
    for seconds in ("-1", "0.001", "inf", "nan"):  # (0.001: a poll on a thread a millisecond)
        with pytest.raises(ValueError, match="--credentials-reload-seconds"):
            config_from_args(_parser().parse_args(["serve", "--model-repository", str(tmp_path),
                                                   "--credentials-reload-seconds", seconds]), {})
    with pytest.raises(ValueError):
        config_from_args(_parser().parse_args(["serve", "--model-repository", str(tmp_path),
                                               "--tls-cert", str(tokens)]), {})


def _secret_volume(folder: Path, files: dict[str, Path]) -> None:
    """`folder` as the kubelet writes a mounted Secret, and rewrites it when the Secret changes: the files
    in a new timestamped folder, then the `..data` link swapped to it in one rename; each name a link
    through `..data`."""
    import os
    import uuid

    folder.mkdir(exist_ok=True)
    version = folder / f"..{uuid.uuid4().hex}"
    version.mkdir()
    for name, source in files.items():
        (version / name).write_bytes(source.read_bytes())
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(version.name)
    os.replace(folder / "..data_tmp", folder / "..data")


def _handshake(port: int, ca: Path) -> bool:
    """Whether a new connection trusting `ca` gets an answer (its own subchannel: one another channel of
    the process opened before the change would be shared, and keep the certificate it had)."""
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.read_bytes()),
                                  options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return False
    finally:
        channel.close()


def _eventually(predicate, what: str, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_renewed_certificate_is_served_without_a_restart(repo, tmp_path, pki, caplog):
    """cert-manager renews the certificate of a running server's Secret: new connections get the new
    one (the server read its files once, and served the old certificate until it expired unless
    restarted: a model load and warm-up); files that cannot serve leave the current ones serving."""
    (tmp_path / "other").mkdir()
    other = _pki(tmp_path / "other")  # another CA's
    mount = tmp_path / "tls"
    _secret_volume(mount, {"tls.crt": pki["server.crt"], "tls.key": pki["server.key"]})
    with ServerThread(repo, tls_cert=mount / "tls.crt", tls_key=mount / "tls.key",
                      credentials_reload_seconds=0.1) as server:
        assert server.metric("videogen_credentials_reload_failing", credentials="tls") == 0
        assert server.metric("videogen_tls_certificate_expiry_timestamp_seconds") == _not_after(pki["server.crt"])
        ca = pki["ca.crt"].read_bytes()
        with VideoGenClient(server.target, secure=True, root_certificates=ca) as before:
            assert _run(before).summary.num_frames == 1
            assert _handshake(server.port, pki["ca.crt"]) and not _handshake(server.port, other["ca.crt"])
            _secret_volume(mount, {"tls.crt": other["server.crt"], "tls.key": other["server.key"]})
            _eventually(lambda: _handshake(server.port, other["ca.crt"]), "the renewed certificate is not served")
            assert not _handshake(server.port, pki["ca.crt"])
            assert server.metric("videogen_credentials_reloads_total", credentials="tls", result="ok") == 1
            # the renewed certificate's end of validity (an alert watches it: renewals that stopped)
            assert server.metric("videogen_tls_certificate_expiry_timestamp_seconds") == _not_after(other["server.crt"])
            # a connection made before keeps its session (until it closes: --max-connection-age-seconds)
            assert before.list_models()[0].name == "svd-tiny"
        # a key of another certificate (a copy caught halfway; a wrong Secret): logged, the last good serves
        caplog.set_level("WARNING", logger="videogen_server.transport.credentials")
        _secret_volume(mount, {"tls.crt": pki["server.crt"], "tls.key": other["server.key"]})
        _eventually(lambda: server.metric("videogen_credentials_reload_failing", credentials="tls") == 1,
                    "a certificate that cannot serve is not reported")
        assert _handshake(server.port, other["ca.crt"]) and not _handshake(server.port, pki["ca.crt"])
        assert server.metric("videogen_credentials_reloads_total", credentials="tls", result="error") == 1
        failures = [r.getMessage() for r in caplog.records if "cannot load the new tls files" in r.getMessage()]
        assert len(failures) == 1 and "the key is not the certificate's" in failures[0], failures
        assert "still serving the ones loaded before" in failures[0]
        # a pair OpenSSL reads and gRPC cannot serve: refused when gRPC took it, at the next handshake, and
        # was reported loaded while the old certificate served on (review)
        from cryptography.hazmat.primitives.asymmetric import dsa

        dsa_cert, dsa_key = _self_signed(tmp_path, "dsa", dsa.generate_private_key(2048))
        _secret_volume(mount, {"tls.crt": dsa_cert, "tls.key": dsa_key})
        _eventually(lambda: server.metric("videogen_credentials_reloads_total", credentials="tls", result="error") == 2,
                    "a certificate gRPC cannot serve is not reported")
        assert server.metric("videogen_credentials_reload_failing", credentials="tls") == 1
        assert _handshake(server.port, other["ca.crt"])
        _secret_volume(mount, {"tls.crt": pki["server.crt"], "tls.key": pki["server.key"]})
        _eventually(lambda: _handshake(server.port, pki["ca.crt"]), "the mended files are not served")
        assert server.metric("videogen_credentials_reload_failing", credentials="tls") == 0
        assert server.metric("videogen_credentials_reloads_total", credentials="tls", result="ok") == 2
        assert len([r for r in caplog.records if "cannot load" in r.getMessage()]) == 2  # once each, not every poll


def test_a_rotated_token_file_is_loaded_without_a_restart(repo, tmp_path):
    """Tokens rotate by editing the file: the new ones are taken, the removed ones refused, a file left
    without a token (or unreadable) keeps the current tokens and says so; VIDEOGEN_AUTH_TOKENS' stay."""
    import os

    path = tmp_path / "tokens"
    path.write_text("old\n")

    def rewrite(text: str) -> None:  # as an editor or a config tool saves: a new file renamed over it
        (tmp_path / "tokens.new").write_text(text)
        os.replace(tmp_path / "tokens.new", path)

    def accepted(token: str) -> bool:
        with VideoGenClient(server.target, token=token, retry=False) as client:
            try:
                client.list_models(timeout=10)
                return True
            except UnauthenticatedError:
                return False

    with ServerThread(repo, auth_tokens=("fixed",), auth_token_file=path, credentials_reload_seconds=0.1) as server:
        assert accepted("old") and accepted("fixed") and not accepted("new")
        # the rotation README gives: the new token added, the callers moved to it, the old one removed; a
        # long-lived caller reads its token from a file (TokenFile) and moves without a new client
        held = tmp_path / "client-token"
        held.write_text("old\n")
        with VideoGenClient(server.target, token=TokenFile(held), retry=False) as caller:
            assert caller.list_models(timeout=10)[0].name == "svd-tiny"
            rewrite("# rotated\nold\nnew\n")
            _eventually(lambda: accepted("new"), "the new token is refused")
            assert accepted("old")
            (tmp_path / "client-token.new").write_text("new\n")
            os.replace(tmp_path / "client-token.new", held)
            rewrite("new\nnewer\n")
            _eventually(lambda: not accepted("old"), "the removed token is still accepted")
            assert caller.list_models(timeout=10)[0].name == "svd-tiny"  # on the new token, same client
            assert _run(caller).summary.num_frames == 1
        assert accepted("newer") and accepted("fixed")
        assert server.metric("videogen_credentials_reloads_total", credentials="tokens", result="ok") == 2
        for text in ("# emptied by mistake\n", "caf\u00e9\n"):
            rewrite(text)
            _eventually(lambda: server.metric("videogen_credentials_reload_failing", credentials="tokens") == 1,
                        f"a token file of {text!r} is not reported")
            assert accepted("new") and accepted("fixed")  # (not a server open to all, nor one refusing all)
            rewrite("new\n")
            _eventually(lambda: server.metric("videogen_credentials_reload_failing", credentials="tokens") == 0,
                        "the mended file is not loaded")
        assert not accepted("newer")
        assert server.metric("videogen_credentials_reloads_total", credentials="tokens", result="error") == 2


def test_model_control_takes_its_own_tokens(repo, tmp_path):
    """As Triton's restricted "model-repository" protocol: with model-control tokens configured, any other
    valid token may generate but not load or unload (PERMISSION_DENIED: before, every caller with a token
    could unload every model), on both APIs; a model-control token is valid everywhere; its file rotates
    like the other. Model-control tokens alone leave the other calls open."""
    import os

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    from videogen_client import PermissionDeniedError

    path = tmp_path / "control-tokens"
    path.write_text("# operators\nadmin-1\n")
    with ServerThread(repo, model_control_mode="explicit", load_models=("*",), auth_tokens=("user",),
                      model_control_token_file=path, credentials_reload_seconds=0.1) as server:
        with VideoGenClient(server.target, token="user", retry=False) as user:
            assert _run(user).summary.num_frames == 1 and user.list_models()[0].name == "svd-tiny"
            for call in (user.unload_model, user.load_model):
                with pytest.raises(PermissionDeniedError) as denied:
                    call("svd-tiny")
                assert denied.value.error_reason == "MODEL_CONTROL_NOT_PERMITTED", denied.value
        kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        for token, code in (("user", grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED),
                            ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            with pytest.raises(grpc.RpcError) as refused:
                kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="svd-tiny"),
                                             metadata=metadata, timeout=10)
            assert refused.value.code() == code, token
        assert server.metric("videogen_auth_failures_total", method="/videogen.v1.VideoGen/UnloadModel") == 1
        assert server.metric("videogen_auth_failures_total",
                             method="/inference.GRPCInferenceService/RepositoryModelUnload") == 3
        assert server.engine.model_ready("svd-tiny")  # nothing refused reached the engine
        with VideoGenClient(server.target, token="admin-1", retry=False) as admin:
            admin.unload_model("svd-tiny")
            assert not server.engine.model_ready("svd-tiny")
            admin.load_model("svd-tiny")
            assert _run(admin).summary.num_frames == 1  # valid for every call
        # rotated: the new token taken, the removed one no longer valid anywhere
        (tmp_path / "control-tokens.new").write_text("admin-2\n")
        os.replace(tmp_path / "control-tokens.new", path)
        _eventually(lambda: server.metric("videogen_credentials_reloads_total", credentials="model_control_tokens",
                                          result="ok") == 1, "the rotated model-control tokens are not loaded")
        with VideoGenClient(server.target, token="admin-1", retry=False) as old, pytest.raises(UnauthenticatedError):
            old.list_models()
        with VideoGenClient(server.target, token="admin-2", retry=False) as admin:
            assert admin.load_model("svd-tiny").name == "svd-tiny"
        assert server.metric("videogen_credentials_reloads_total", credentials="tokens", result="ok") == 0

    with ServerThread(repo, model_control_mode="explicit", load_models=("*",), model_control_tokens=("admin",)) as server:
        scrape = server.scrape()  # the refusals that can happen here exported at 0, those that cannot not at all
        assert metric_value(scrape, "videogen_auth_failures_total", method="/videogen.v1.VideoGen/UnloadModel") == 0
        assert 'method="/videogen.v1.VideoGen/UnloadModel"' in scrape
        assert 'videogen_auth_failures_total{method="/videogen.v1.VideoGen/Generate"}' not in scrape
        with VideoGenClient(server.target, retry=False) as anyone:
            assert _run(anyone).summary.num_frames == 1  # no token needed but for model control
            with pytest.raises(UnauthenticatedError, match="model-control"):
                anyone.unload_model("svd-tiny")
        with VideoGenClient(server.target, token="admin", retry=False) as admin:
            admin.unload_model("svd-tiny")

    from videogen_server.config import ServerConfig

    with pytest.raises(ValueError, match="explicit"):
        ServerConfig(model_repositories=(repo,), model_control_tokens=("admin",))
    with pytest.raises(ValueError, match="--model-control-token-file"):
        ServerConfig(model_repositories=(repo,), model_control_mode="explicit",
                     model_control_token_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="is --auth-token-file"):  # every caller a model controller
        ServerConfig(model_repositories=(repo,), model_control_mode="explicit", model_control_token_file=path,
                     auth_token_file=tmp_path / "." / "control-tokens")


def test_credentials_read_once_with_reloads_off(repo, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("old\n")
    with ServerThread(repo, auth_token_file=path, credentials_reload_seconds=0) as server:
        # no poller at all (a 0.5 s wait alone passed with one polling every 10 s: tests audit)
        assert server.server._reloads is None
        path.write_text("new\n")
        import time

        time.sleep(0.5)
        with VideoGenClient(server.target, token="old", retry=False) as client:
            assert client.list_models(timeout=10)[0].name == "svd-tiny"
        with VideoGenClient(server.target, token="new", retry=False) as client:
            with pytest.raises(UnauthenticatedError):
                client.list_models(timeout=10)
