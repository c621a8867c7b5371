"""Config keys: defaults, and a bad key, type or value stops `serve` naming the key."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from hq_gevent import config


def test_defaults_are_the_1x_values():
    c = config.load(None)
    assert (c.server_id, c.addr, c.data_dir, c.log_level, c.queues, c.max_workers) == (0, "0.0.0.0:19900", None, "info", 8192, 0)
    assert (c.shutdown_timeout, c.job_lifetime, c.job_list_default_limit, c.ui, c.ui_basename) == (10, 2419200, 0, True, "/ui")
    assert c.dispatchers == os.cpu_count()
    assert (c.wal_fsync, c.max_output_bytes, c.max_body_bytes) == ("always", 1048576, 10485760)
    assert (c.wal_compact_min_bytes, c.wal_compact_ratio) == (67108864, 2.0)


def run_serve(tmp_path, text, *args):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "hq_gevent", "serve", "-c", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text,key", [
    ("bogus = 1", "bogus"),
    ('queues = "many"', "queues"),
    ("queues = 0", "queues"),
    ("server_id = 1024", "server_id"),
    ("server_id = -1", "server_id"),
    ('log_level = "loud"', "log_level"),
    ('wal_fsync = "sometimes"', "wal_fsync"),
    ("ui = 1", "ui"),
    ('addr = "nohostport"', "addr"),
    ("dispatchers = 0", "dispatchers"),
    ("max_workers = -1", "max_workers"),
    ("wal_compact_ratio = 0.5", "wal_compact_ratio"),
    ('ui_basename = "ui/"', "ui_basename"),
    ("job_lifetime = true", "job_lifetime"),
])
def test_bad_config_stops_the_server_naming_the_key(tmp_path, text, key):
    result = run_serve(tmp_path, text)
    assert result.returncode == 1
    assert f"'{key}'" in result.stderr and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_invalid_toml_and_missing_file(tmp_path):
    result = run_serve(tmp_path, "queues = = 3")
    assert result.returncode == 1 and "invalid TOML" in result.stderr
    result = subprocess.run([sys.executable, "-m", "hq_gevent", "serve", "-c", str(tmp_path / "none.toml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "cannot read config file" in result.stderr


def test_log_level_flag_overrides_and_is_validated(tmp_path):
    result = run_serve(tmp_path, "", "-l", "chatty")
    assert result.returncode == 1 and "'log_level'" in result.stderr


def test_env_config_and_log_level(make_server, tmp_path):
    srv = make_server(start=False, log_level="warn")
    srv.write_config()
    env = dict(os.environ, HQ_CONFIG=str(srv.config_path), HQ_LOG_LEVEL="debug")
    proc = subprocess.Popen([sys.executable, "-m", "hq_gevent", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        srv.proc = proc
        srv._log_file = open(os.devnull, "ab")
        srv.wait_ready()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"Listening on 127.0.0.1:{srv.port}" in out  # HQ_CONFIG was read
    assert " INFO " in out  # HQ_LOG_LEVEL=debug overrides the file's warn
