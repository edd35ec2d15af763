import ssl
from pathlib import Path

import pytest
import trustme

from graceful_close.diagnostics.launch import ServerProcess
from tests.helpers import trusting


@pytest.fixture
def start_server():
    """Start ServerProcess objects; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(server: ServerProcess) -> ServerProcess:
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory) -> tuple[Path, trustme.CA]:
    """A test CA and its certificate for 127.0.0.1 and localhost, written as
    <dir>/key.pem and <dir>/cert.pem (with the chain), for servers started with TLS."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certdir = tmp_path_factory.mktemp("certs")
    cert.private_key_pem.write_to_path(str(certdir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(certdir / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certdir / "cert.pem"), append=True)
    return certdir, ca


@pytest.fixture(scope="session")
def certs(tls_certs) -> tuple[Path, ssl.SSLContext]:
    """tls_certs' directory and a client context that trusts its CA."""
    certdir, ca = tls_certs
    return certdir, trusting(ca)


@pytest.fixture(autouse=True)
def _short_churn_graceful_timeout(monkeypatch, request):
    """Issue 16's tests start gunicorn through benchmarks.churn: a shorter --graceful-timeout,
    since stock UvicornWorker ignores the quick stop and always waits that long to exit."""
    if request.module.__name__.startswith("tests.test_stop_drain"):
        import benchmarks.churn

        monkeypatch.setattr(benchmarks.churn, "GRACEFUL_TIMEOUT", 4)
