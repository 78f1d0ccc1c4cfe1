"""A cluster's credentials: a certificate authority and one certificate per host.

Hosts of a cluster authenticate each other with mutual TLS 1.3 from the standard
library's `ssl` (net/tcp.py; README, "Network over TCP"). Each host has a private key and
a certificate whose subject common name is its host name, signed by the cluster's CA. A
connection is accepted only from a peer whose certificate that CA signed, and the peer's
host name is read from its certificate, never from anything it sends. There is no
hand-made cryptography: keys, certificates and signatures are made by the `openssl`
command (the standard library cannot make them), and the handshake and the record
protection are TLS's.

A cluster directory, as `cluster_init` makes it:

    ca.crt      the CA's certificate (every host needs it)
    ca.key      the CA's private key: keep it where hosts are added, nowhere else
    NAME.crt    host NAME's certificate
    NAME.key    host NAME's private key (that host only)

A host needs ca.crt, NAME.crt and NAME.key. Keys are ECDSA P-256.

Invariants: key files are made mode 0600 in a directory of mode 0700 and are never
overwritten; a directory gets one CA; host names are 1..64 characters of letters, digits,
'.', '_' and '-' starting with a letter or digit, not "ca" (they are file names and
certificate subjects); `tls_contexts` refuses credentials whose certificate does not name the host,
whose key does not match it, or that the CA did not sign.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from pymach.errors import MachError

CA_DAYS = 3650
HOST_DAYS = 825
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = pymach
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[host_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def check_host_name(name: str) -> str:
    """`name` if it can name a cluster host; KERN_INVALID_ARGUMENT otherwise."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name == "ca":
        raise MachError("KERN_INVALID_ARGUMENT", f"{name!r} cannot name a host: use 1 to 64 "
                        f"letters, digits, '.', '_' or '-', starting with a letter or digit "
                        f"(and not 'ca', the CA's files)")
    return name


@dataclass(frozen=True)
class Credentials:
    """Where one host's credentials are in a cluster directory."""

    directory: str
    host: str

    @property
    def ca(self) -> str:
        """The cluster CA's certificate."""
        return os.path.join(self.directory, "ca.crt")

    @property
    def cert(self) -> str:
        """The host's certificate."""
        return os.path.join(self.directory, f"{self.host}.crt")

    @property
    def key(self) -> str:
        """The host's private key."""
        return os.path.join(self.directory, f"{self.host}.key")


# -- making credentials (the openssl command) ----------------------------------------------
def cluster_init(directory: str, hosts: list[str], host_days: int = HOST_DAYS
                 ) -> tuple[list[str], list[str]]:
    """Make the cluster CA in `directory` if it has none, and a key and certificate for each
    host in `hosts` that has none yet; returns (files made, hosts that already had theirs).
    KERN_INVALID_ARGUMENT for a bad host name; KERN_FAILURE if openssl is missing or fails
    (its message says why)."""
    for name in hosts:
        check_host_name(name)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise MachError("KERN_FAILURE", "making a cluster's certificates needs the openssl "
                        "command (apt-get install openssl)")
    _private_dir(directory)
    made: list[str] = []
    kept: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        config = os.path.join(scratch, "openssl.cnf")
        with open(config, "w") as f:
            f.write(_OPENSSL_CONFIG)
        ca = Credentials(directory, "ca")
        if not os.path.exists(ca.cert):
            _make_ca(openssl, config, ca)
            made += [ca.cert, ca.key]
        for name in dict.fromkeys(hosts):
            host = Credentials(directory, name)
            if os.path.exists(host.cert) or os.path.exists(host.key):
                kept.append(name)
                continue
            _make_host(openssl, config, ca, host, scratch, host_days)
            made += [host.cert, host.key]
    return made, kept


def _private_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise MachError("KERN_FAILURE", f"cannot make {directory}: {e.strerror}") from None
    if not os.path.isdir(directory):
        raise MachError("KERN_INVALID_ARGUMENT", f"{directory} is not a directory")


def _make_ca(openssl: str, config: str, ca: Credentials) -> None:
    label = f"/CN=pymach cluster CA {secrets.token_hex(4)}"
    _run(openssl, "req", "-config", config, "-x509", "-new", *_NEW_KEY, "-keyout", ca.key,
         "-out", ca.cert, "-days", str(CA_DAYS), "-subj", label, "-extensions", "ca_ext")
    _modes(ca)


def _make_host(openssl: str, config: str, ca: Credentials, host: Credentials, scratch: str,
               days: int) -> None:
    csr = os.path.join(scratch, f"{host.host}.csr")
    _run(openssl, "req", "-config", config, "-new", *_NEW_KEY, "-keyout", host.key,
         "-out", csr, "-subj", f"/CN={host.host}")
    _run(openssl, "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
         "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(days),
         "-extfile", config, "-extensions", "host_ext", "-out", host.cert)
    _modes(host)


def _modes(creds: Credentials) -> None:
    os.chmod(creds.key, 0o600)
    os.chmod(creds.cert, 0o644)


def _run(openssl: str, *args: str) -> None:
    """Run openssl (keys it writes are private from the start: umask 077)."""
    r = subprocess.run([openssl, *args], capture_output=True, text=True, umask=0o077,
                       check=False)
    if r.returncode != 0:
        detail = r.stderr.strip().splitlines()
        raise MachError("KERN_FAILURE", f"openssl {args[0]} failed: "
                        f"{detail[-1] if detail else r.returncode}")


# -- using credentials (the ssl module) -----------------------------------------------------
def tls_contexts(creds: Credentials) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for host `creds.host`: TLS 1.3 only, our
    certificate presented and the peer's required and checked against the cluster CA
    both ways. KERN_INVALID_ARGUMENT if the files are missing, the key does not match the
    certificate, the CA did not sign it, or it names another host."""
    check_host_name(creds.host)
    for path in (creds.ca, creds.cert, creds.key):
        if not os.path.isfile(path):
            raise MachError("KERN_INVALID_ARGUMENT", f"{path} is missing (make it with "
                            f"`pymach cluster init {creds.directory} {creds.host}`)")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # identity is the certificate's name (cert_host)
    try:
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_cert_chain(creds.cert, creds.key)
            ctx.load_verify_locations(creds.ca)
        ours = cert_host(_handshake_with_self(server, client))
    except (ssl.SSLError, OSError) as e:
        raise MachError("KERN_INVALID_ARGUMENT", f"the credentials of {creds.host!r} in "
                        f"{creds.directory} are not usable: {e}") from None
    if ours != creds.host:
        raise MachError("KERN_INVALID_ARGUMENT", f"{creds.cert} is the certificate of "
                        f"{ours!r}, not {creds.host!r}")
    return server, client


def _handshake_with_self(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, Any]:
    """A TLS handshake between the two contexts in memory; the client's certificate as the
    server verified it (so: ours, checked against the CA, its key proven)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_side=False)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):
        pending = False
        for end in (tls_client, tls_server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pending = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            break
    cert = tls_server.getpeercert()
    if not cert:
        raise ssl.SSLError("the handshake with ourselves did not complete")
    return cert


def cert_host(cert: dict[str, Any] | None) -> str:
    """The host a verified peer certificate (`getpeercert()`) names; KERN_INVALID_ARGUMENT
    if it names none, or not a valid host."""
    names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn
             if key == "commonName"]
    if len(names) != 1:
        raise MachError("KERN_INVALID_ARGUMENT", "the peer's certificate names no host")
    return check_host_name(names[0])
