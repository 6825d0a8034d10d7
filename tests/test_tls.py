"""TLS on the public port: a client that trusts the certificate streams; a plaintext one cannot."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from client import Client
from tests.service import Service


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def service(tiny_model_dir, cert):
    svc = Service(tiny_model_dir, scheduler={"tls_cert": cert[0], "tls_key": cert[1]}, num_kv_blocks=16)
    yield svc
    svc.stop()


def test_tls_client_streams(service, cert) -> None:
    with open(cert[0], "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    with Client(service.addr, grpc.secure_channel(service.addr, creds)) as c:
        msgs = list(c.generate([5, 6, 7], max_tokens=4, ignore_eos=True))
    assert sum(len(m.token_ids) for m in msgs) == 4


def test_plaintext_client_is_refused(service) -> None:
    with Client(service.addr) as c, pytest.raises(grpc.RpcError) as err:
        list(c.generate([5, 6, 7], max_tokens=4, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_health_and_generate_over_tls(service, cert) -> None:
    tls = ["--addr", service.addr, "--tls-ca", cert[0]]
    health = subprocess.run(["nanovllm", "health", *tls], capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    plain = subprocess.run(["nanovllm", "health", "--addr", service.addr], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    gen = subprocess.run(
        ["nanovllm", "generate", *tls, "--prompt", "The quick", "--max-tokens", "4", "--ignore-eos"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
