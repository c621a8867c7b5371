"""Server configuration: the HQ 1.x keys plus hq-gevent's own, loaded from TOML and validated."""
import os
from dataclasses import dataclass, field, fields

import toml

from hq_gevent import hosts, signing


class ConfigError(Exception):
    pass


LOG_LEVELS = ("debug", "info", "warn", "error")
WAL_FSYNC = ("always", "everysec", "no")
LOG_FORMATS = ("text", "json")
STORES = ("wal", "postgresql")
SECRET_KEYS = ("auth_tokens", "auth_read_tokens", "signing_secrets", "postgresql_dsn")  # never echoed in an error


@dataclass
class Config:
    server_id: int = 0
    addr: str = "0.0.0.0:19900"
    data_dir: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    access_log_file: str | None = None
    queues: int = 8192
    dispatchers: int = os.cpu_count() or 1
    max_workers: int = 0
    shutdown_timeout: int = 10
    job_lifetime: int = 2419200
    job_lifetime_interval: int = 60
    job_list_default_limit: int = 0
    ui: bool = True
    ui_basename: str = "/ui"
    wal_fsync: str = "always"
    max_output_bytes: int = 1048576
    max_body_bytes: int = 10485760
    wal_compact_min_bytes: int = 67108864
    wal_compact_ratio: float = 2.0
    # Delivery policy (SPEC §10): server defaults for a job's retry policy, and dedup window.
    retry_max_attempts: int = 1
    retry_min_backoff: float = 1.0
    retry_max_backoff: float = 3600.0
    retry_max_duration: float = 0.0
    unique_window: int = 86400
    # Security (SPEC §11).
    auth_tokens: list[str] = field(default_factory=list)
    auth_read_tokens: list[str] = field(default_factory=list)
    auth_tokens_file: str | None = None
    auth_read_tokens_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    signing_secrets: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    request_header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 4096
    # Observability (SPEC §12).
    metrics_public: bool = False
    log_format: str = "text"
    # Stores (SPEC §13): the embedded write-ahead log, or PostgreSQL shared by several servers.
    store: str = "wal"
    postgresql_dsn: str | None = None
    lease_seconds: int = 30

    @property
    def host_port(self):
        host, sep, port = self.addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


# key -> (predicate, what it must be); types are checked separately from the dataclass.
_RANGES = {
    "server_id": (lambda v: 0 <= v <= 1023, "an integer from 0 to 1023"),
    "queues": (lambda v: v >= 1, "an integer >= 1"),
    "dispatchers": (lambda v: v >= 1, "an integer >= 1"),
    "max_workers": (lambda v: v >= 0, "an integer >= 0"),
    "shutdown_timeout": (lambda v: v >= 0, "an integer >= 0"),
    "job_lifetime": (lambda v: v >= 0, "an integer >= 0"),
    "job_lifetime_interval": (lambda v: v >= 1, "an integer >= 1"),
    "job_list_default_limit": (lambda v: v >= 0, "an integer >= 0"),
    "log_level": (lambda v: v in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
    "wal_fsync": (lambda v: v in WAL_FSYNC, "one of " + ", ".join(WAL_FSYNC)),
    "max_output_bytes": (lambda v: v >= 1, "an integer >= 1"),
    "max_body_bytes": (lambda v: v >= 1, "an integer >= 1"),
    "wal_compact_min_bytes": (lambda v: v >= 0, "an integer >= 0"),
    "wal_compact_ratio": (lambda v: v >= 1.0, "a number >= 1.0"),
    "ui_basename": (lambda v: v.startswith("/") and not v.endswith("/") and len(v) > 1, 'a path like "/ui"'),
    "addr": (lambda v: _valid_addr(v), 'a "host:port" address'),
    "retry_max_attempts": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "retry_min_backoff": (lambda v: 0 < v <= 86400, "a number of seconds > 0 and <= 86400"),
    "retry_max_backoff": (lambda v: 0 < v <= 86400, "a number of seconds > 0 and <= 86400"),
    "retry_max_duration": (lambda v: v >= 0, "a number of seconds >= 0"),
    "unique_window": (lambda v: v >= 0, "an integer >= 0"),
    "auth_tokens": (lambda v: all(len(t) >= 16 for t in v), "a list of tokens of at least 16 characters"),
    "auth_read_tokens": (lambda v: all(len(t) >= 16 for t in v), "a list of tokens of at least 16 characters"),
    "signing_secrets": (lambda v: all(t.startswith("whsec_") for t in v), 'a list of "whsec_<base64>" secrets'),
    "request_header_timeout": (lambda v: v > 0, "a number of seconds > 0"),
    "keepalive_timeout": (lambda v: v > 0, "a number of seconds > 0"),
    "max_connections": (lambda v: v >= 1, "an integer >= 1"),
    "log_format": (lambda v: v in LOG_FORMATS, "one of " + ", ".join(LOG_FORMATS)),
    "store": (lambda v: v in STORES, "one of " + ", ".join(STORES)),
    "lease_seconds": (lambda v: 5 <= v <= 3600, "an integer from 5 to 3600"),
}


def _valid_addr(addr):
    host, sep, port = addr.rpartition(":")
    return bool(sep) and port.isdigit() and 0 <= int(port) <= 65535


def _type_ok(value, annotation):
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == list[str]:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)  # str and "str | None"


def from_dict(values):
    known = {f.name: f for f in fields(Config)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'")
        shown = "(value not shown)" if key in SECRET_KEYS else repr(value)
        if not _type_ok(value, known[key].type):
            raise ConfigError(f"config key '{key}' has the wrong type: {shown}")
        check = _RANGES.get(key)
        if check and not check[0](value):
            raise ConfigError(f"config key '{key}' must be {check[1]}, not {shown}")
    config = Config(**values)
    for f in fields(Config):
        if f.type is float and isinstance(getattr(config, f.name), int):
            setattr(config, f.name, float(getattr(config, f.name)))
    if config.retry_max_backoff < config.retry_min_backoff:
        raise ConfigError("config key 'retry_max_backoff' must be >= retry_min_backoff")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ConfigError("config keys 'tls_cert_file' and 'tls_key_file' must be set together")
    try:
        hosts.AllowedHosts(config.allowed_hosts)
    except ValueError as e:
        raise ConfigError(f"config key 'allowed_hosts': {e}") from None
    try:
        signing.Signer(config.signing_secrets)
    except signing.SigningError as e:
        raise ConfigError(f"config key 'signing_secrets': {e}") from None
    return config


def load(path=None, log_level=None):
    """Config from a TOML file (None → embedded defaults); log_level overrides the file."""
    values = {}
    if path:
        try:
            with open(path) as f:
                values = toml.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except toml.TomlDecodeError as e:
            raise ConfigError(f"invalid TOML in {path}: {e}") from None
    if log_level:
        values["log_level"] = log_level.lower()
    config = from_dict(values)
    if os.environ.get("HQ_POSTGRESQL_DSN"):
        config.postgresql_dsn = os.environ["HQ_POSTGRESQL_DSN"]
    if config.store == "postgresql" and not config.postgresql_dsn:
        raise ConfigError("config key 'postgresql_dsn' (or $HQ_POSTGRESQL_DSN) is required with store = \"postgresql\"")
    return config
