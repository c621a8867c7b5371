"""A throwaway PostgreSQL cluster for the tests and the bench: initdb + pg_ctl in a temp dir,
listening on a free loopback port only, removed by stop().

initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user
(the one the distribution's server package creates) and its commands run through runuser.
"""
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time


def find_bin_dir():
    """The directory holding initdb/pg_ctl: $PG_BIN, Debian's /usr/lib/postgresql/<ver>/bin
    (newest), or the PATH (EL's postgresql-server puts them in /usr/bin)."""
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"]
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if versions:
        return os.path.dirname(versions[-1])
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PGCluster:
    """start() -> self; dsn(dbname) -> a libpq URL; create_database(); restart(); stop()."""

    def __init__(self, durable=True, settings=None):
        self.bin_dir = find_bin_dir()
        if self.bin_dir is None:
            raise FileNotFoundError("PostgreSQL's initdb was not found (install the postgresql server package)")
        self.as_postgres = os.geteuid() == 0
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="hq-pg-")
        self.data = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "server.log")
        # Tests trade crash safety of the machine for speed (a clean pg_ctl restart keeps every
        # commit either way); the bench keeps PostgreSQL's durable defaults.
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "400",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        if not durable:
            self.settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        self.settings.update(settings or {})

    def _run(self, *args, check=True, timeout=60):
        cmd = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True)

    def start(self):
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for key, value in self.settings.items():
                f.write(f"{key} = {value}\n")
        self.pg_ctl_start()
        return self

    def pg_ctl_start(self):
        self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "start")

    def restart(self):
        """pg_ctl restart -m fast: every client connection is cut, the server comes back."""
        self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "-m", "fast", "restart")

    def pg_ctl_stop(self):
        self._run("pg_ctl", "-D", self.data, "-w", "-t", "60", "-m", "fast", "stop", check=False)

    def dsn(self, dbname="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement, dbname="postgres"):
        """Run one statement through psql (autocommit): its unaligned output."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                         "-d", dbname, "-v", "ON_ERROR_STOP=1", "-c", statement).stdout.strip()

    def create_database(self, name):
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def stop(self):
        try:
            self.pg_ctl_stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def wait_until(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
