"""Server configuration: the HQ 1.x keys plus hq-gevent's own, loaded from TOML and validated."""
import os
from dataclasses import dataclass, fields

import toml


class ConfigError(Exception):
    pass


LOG_LEVELS = ("debug", "info", "warn", "error")
WAL_FSYNC = ("always", "everysec", "no")


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
    return isinstance(value, str)  # str and "str | None"


def from_dict(values):
    known = {f.name: f for f in fields(Config)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'")
        if not _type_ok(value, known[key].type):
            raise ConfigError(f"config key '{key}' has the wrong type: {value!r}")
        check = _RANGES.get(key)
        if check and not check[0](value):
            raise ConfigError(f"config key '{key}' must be {check[1]}, not {value!r}")
    config = Config(**values)
    if isinstance(config.wal_compact_ratio, int):
        config.wal_compact_ratio = float(config.wal_compact_ratio)
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
    return from_dict(values)
