"""The served certificate's end of validity, read from its DER (the metric and alert: test_security)."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from videogen_server.transport.credentials import certificate_not_after


def _pem(key, not_after: datetime.datetime, *, extensions: bool = True) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "an organisation of a long name " * 2),
                      x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
               .not_valid_after(not_after))
    if extensions:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("not_after", [
    datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc),  # UTCTime
    datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc),  # UTCTime's last year
    datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=datetime.timezone.utc),  # GeneralizedTime from 2050 (RFC 5280)
    datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc),  # "no well-defined expiry"
])
def test_the_end_of_validity_is_the_certificates(not_after):
    for key in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(public_exponent=65537, key_size=2048)):
        pem = _pem(key, not_after)
        assert certificate_not_after(pem) == not_after.timestamp()
        # a chain: the first certificate is the server's
        other = _pem(key, datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc), extensions=False)
        assert certificate_not_after(b"junk before\n" + pem + other) == not_after.timestamp()


def test_what_is_not_a_certificate_is_refused():
    with pytest.raises(ValueError, match="no PEM certificate"):
        certificate_not_after(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not a DER certificate"):
        certificate_not_after(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError):
        certificate_not_after(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
