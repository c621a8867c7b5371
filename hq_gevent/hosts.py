"""Where jobs may send requests (SPEC §11 `allowed_hosts`).

Patterns: `host` (exact, case-insensitive), `*.example.com` (any subdomain), `host:port`,
an IP address (`10.0.0.5`, `fd00::1`, with a port: `10.0.0.5:8080`, `[fd00::1]:8080`) or a CIDR
block (`10.0.0.0/8`, `fd00::/8`). An empty list allows anywhere.

A name that matches a name pattern is trusted wherever it resolves. Any other name can only be
judged by the address it resolves to, so it passes at push when address patterns exist, and the
worker request then connects only to a resolved address that an address pattern allows
(resolved once, and that very address connected to: no second lookup a DNS server could answer
differently).
"""
import ipaddress
import re
from urllib.parse import urlsplit

LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class AddressNotAllowed(OSError):
    """The worker request's host resolved only to addresses no pattern allows."""

    def __init__(self, address):
        super().__init__(f"address not allowed ({address})")
        self.address = address


def _port(text, pattern):
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allowed_hosts: {pattern!r}: the port must be a number from 1 to 65535")
    return int(text)


def _name(text, pattern):
    """A host name pattern, lower-case, without a trailing dot; ValueError if it is not one."""
    name = text.lower().rstrip(".")
    if not name or len(name) > 253 or not all(LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"allowed_hosts: {pattern!r} is not a host name, *.domain, host:port, IP address or CIDR block")
    return name


def parse(pattern):
    """(kind, value, port or None): ("net", ip_network), ("name", "host") or ("suffix", ".domain")."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("allowed_hosts: an empty pattern (an empty list allows any host)")
    text = pattern.strip()
    if "/" in text:
        try:
            return "net", ipaddress.ip_network(text, strict=False), None
        except ValueError:
            raise ValueError(f"allowed_hosts: {pattern!r} is not a CIDR block like 10.0.0.0/8 or fd00::/8") from None
    host, port = text, None
    if text.startswith("["):  # [v6] or [v6]:port
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"allowed_hosts: {pattern!r}: write an IPv6 address with a port as [addr]:port")
        port = _port(rest[1:], pattern) if rest else None
    elif text.count(":") == 1:  # host:port (an IPv6 address has several colons)
        host, _, rest = text.partition(":")
        port = _port(rest, pattern)
    try:
        return "net", ipaddress.ip_network(ipaddress.ip_address(host)), port
    except ValueError:
        if text.startswith("["):
            raise ValueError(f"allowed_hosts: {pattern!r}: not an IPv6 address between the brackets") from None
    if host.startswith("*."):
        return "suffix", "." + _name(host[2:], pattern), port
    return "name", _name(host, pattern), port


def ip_of(host):
    """The address of an IP-literal host (as urlsplit gives it, IPv6 without brackets), else None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


class AllowedHosts:
    def __init__(self, patterns):
        parsed = [parse(p) for p in patterns]
        self.names = [(kind, value, port) for kind, value, port in parsed if kind != "net"]
        self.networks = [(net, port) for kind, net, port in parsed if kind == "net"]

    def __bool__(self):
        return bool(self.names or self.networks)

    def name_allowed(self, host, port):
        """Does a name pattern allow `host` (lower-case) on `port`?"""
        host = host.rstrip(".")
        for kind, value, want_port in self.names:
            matches = host.endswith(value) if kind == "suffix" else host == value
            if matches and (want_port is None or want_port == port):
                return True
        return False

    def address_allowed(self, address, port):
        """Does an address pattern allow `address` (an ipaddress object or text) on `port`?"""
        if isinstance(address, str):
            address = ipaddress.ip_address(address.split("%", 1)[0])
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        return any(address in net and (want is None or want == port) for net, want in self.networks)

    def needs_address_check(self, host, port):
        """True when the connection's address must pass address_allowed (false when a name
        pattern vouches for the host, or when there is no restriction at all)."""
        if not self:
            return False
        return ip_of(host) is not None or not self.name_allowed(host, port)

    def push_refusal(self, url):
        """None if a job may be pushed with this url, else the 422 message."""
        if not self:
            return None
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            port = None
        address = ip_of(host)
        if address is not None:
            allowed = self.address_allowed(address, port)
        else:
            # A name no name pattern allows may still resolve to an allowed address: checked at connect.
            allowed = self.name_allowed(host, port) or bool(self.networks)
        return None if allowed else f"'url' host is not allowed: {host}"
