"""Packaging (issue 5): etc/hq-gevent.toml, the systemd unit, and the RPM that rpm/build.sh makes.

The RPM is built once per test module (`rpm_file`) with Debian's rpmbuild and installed with
`rpm -i --root DIR --nodeps --noscripts` into a scratch root (`installed_root`). Its virtualenv is
built for /opt/hq-gevent, and it runs from DIR unchanged: a venv's interpreter takes its prefix
from the pyvenv.cfg beside it (DIR/opt/hq-gevent/pyvenv.cfg, `home = /usr/bin`), so
DIR/opt/hq-gevent/bin/python imports the packaged libraries, not the checkout's. The only absolute
paths are the scripts' shebangs (`#!/opt/hq-gevent/bin/python`); the tests check them as text and
run the packaged scripts (through the DIR/usr/bin/hq-gevent symlink) with that interpreter. No
relocation trick or PYTHONHOME is involved, so what runs is byte for byte what the package holds.

`test_service_under_systemd` then installs the RPM with its scriptlets in a container whose PID 1 is
a real systemd (nspawn, booted from a throw-away overlay of this machine's root) and runs the unit
with all of its hardening. rpm/README.md describes each check.
"""
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import fields
from pathlib import Path

import pytest
import requests
import toml

from conftest import ROOT, HQServer, free_port, require_tool
from hq_gevent import __version__
from hq_gevent.config import Config, load as load_config

VENV = "/opt/hq-gevent"
UNIT = ROOT / "etc" / "hq-gevent.service"
CONFIG = ROOT / "etc" / "hq-gevent.toml"
PRODUCTION = {
    "data_dir": "/var/lib/hq-gevent",
    "log_file": "/var/log/hq-gevent/hq-gevent.log",
    "access_log_file": "/var/log/hq-gevent/access.log",
    "auth_tokens_file": "/etc/hq-gevent/tokens",  # secure by default (issue 12): %post makes the token
}
TOKENS = "/etc/hq-gevent/tokens"
# The files of issue 5, where the package puts them (besides the venv itself).
PACKAGED = {
    "/usr/bin/hq-gevent",
    "/etc/hq-gevent/hq-gevent.toml",
    "/etc/sysconfig/hq-gevent",
    "/etc/logrotate.d/hq-gevent",
    "/usr/lib/systemd/system/hq-gevent.service",
    "/var/lib/hq-gevent",
    "/var/log/hq-gevent",
    TOKENS,
    # Operations files for Prometheus and Grafana (README "Observability").
    "/usr/share/hq-gevent",
    "/usr/share/hq-gevent/prometheus.yml",
    "/usr/share/hq-gevent/hq-gevent-alerts.yml",
    "/usr/share/hq-gevent/grafana-dashboard.json",
    f"{VENV}/bin/hq-gevent",
    f"{VENV}/bin/python",
    f"{VENV}/pyvenv.cfg",
}
CONFIG_FILES = {
    "/etc/hq-gevent/hq-gevent.toml",
    TOKENS,
    "/etc/sysconfig/hq-gevent",
    "/etc/logrotate.d/hq-gevent",
}


def run(cmd, timeout=120, **kw):
    """Run a command, return CompletedProcess (text); fail with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def unit_settings(path):
    """systemd unit file → {(section, key): [values in order]} (keys may repeat)."""
    settings, section = {}, None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


# --- the config file -------------------------------------------------------------------------------


def test_config_file_lists_every_key_with_production_values():
    text = CONFIG.read_text()
    parsed = toml.loads(text)
    keys = {f.name for f in fields(Config)}
    # dispatchers defaults to the number of CPUs, which a file cannot say, and a TOML file cannot say
    # "unset" for the optional files: they are shown commented out.
    commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, re.M))
    assert commented == {"dispatchers", "auth_read_tokens_file", "tls_cert_file", "tls_key_file", "postgresql_dsn"}
    assert set(parsed) | commented == keys, f"missing: {keys - set(parsed) - commented}"
    for key, value in PRODUCTION.items():
        assert parsed[key] == value
    # Every set key is documented by a comment right above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z_]+)\s*=", line)
        if m and m.group(1) != "wal_compact_ratio":  # documented with wal_compact_min_bytes
            assert lines[i - 1].startswith("#"), f"{m.group(1)} has no comment"


def test_config_file_is_accepted_by_the_server():
    config = load_config(str(CONFIG))  # the server's own loader: unknown keys, types, ranges
    defaults = Config()
    for f in fields(Config):
        if f.name not in PRODUCTION:
            assert getattr(config, f.name) == getattr(defaults, f.name), f"{f.name} is not the default"


# --- the systemd unit ------------------------------------------------------------------------------


def test_unit_runs_the_packaged_command_as_the_service_user():
    s = unit_settings(UNIT)
    svc = lambda key: s.get(("Service", key), [None])[-1]  # noqa: E731
    assert svc("User") == "hq-gevent"
    assert svc("EnvironmentFile") == "-/etc/sysconfig/hq-gevent"
    assert svc("ExecStart") == "/usr/bin/hq-gevent serve $HQ_OPTS"
    assert svc("ExecReload") == "/bin/kill -USR1 $MAINPID"
    assert svc("KillSignal") == "SIGTERM"
    assert svc("Restart") == "on-failure"
    assert svc("StateDirectory") == "hq-gevent" and svc("LogsDirectory") == "hq-gevent"
    assert set(svc("ReadWritePaths").split()) == {"/var/lib/hq-gevent", "/var/log/hq-gevent"}
    assert svc("ProtectSystem") == "strict"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "MemoryDenyWriteExecute"):
        assert svc(key) == "yes", key
    assert svc("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert svc("CapabilityBoundingSet") == ""
    assert "@system-service" in s[("Service", "SystemCallFilter")]
    assert s[("Install", "WantedBy")] == ["multi-user.target"]


def test_unit_stop_timeout_covers_the_graceful_shutdown():
    """systemd must not SIGKILL a stop that is still inside shutdown_timeout (the original waited forever)."""
    stop_timeout = int(unit_settings(UNIT)[("Service", "TimeoutStopSec")][-1])
    shutdown_timeout = toml.loads(CONFIG.read_text())["shutdown_timeout"]
    assert shutdown_timeout == Config().shutdown_timeout
    assert shutdown_timeout + 3 <= stop_timeout <= shutdown_timeout + 30


def test_unit_security_exposure():
    require_tool("systemd-analyze", "systemd unit checks")
    proc = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)])
    m = re.search(r"Overall exposure level for hq-gevent\.service: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    # 1.1 when written; what is left is the network a job queue needs (PrivateNetwork, IPAddressDeny,
    # AF_INET/AF_UNIX), the host root, group-readable files (UMask 0027) and ProtectClock's rtc rule.
    assert float(m.group(1)) <= 1.5, proc.stdout


# --- the RPM ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpm_topdir(tmp_path_factory):
    """rpmbuild's tree for this session (the wheel download cache stays in rpm/_build/wheels)."""
    return tmp_path_factory.mktemp("rpmbuild")


@pytest.fixture(scope="module")
def rpm_file(rpm_topdir):
    require_tool("rpmbuild", "building the RPM")
    require_tool("rpm", "querying the RPM")
    if not os.access("/usr/bin/python3.11", os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/python3.11 is required in CI (the RPM's venv interpreter)")
        pytest.skip("/usr/bin/python3.11 not installed (the RPM's venv interpreter)")
    env = dict(os.environ, HQ_RPM_TOPDIR=str(rpm_topdir))
    proc = run(["bash", str(ROOT / "rpm" / "build.sh")], timeout=600, env=env)
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.startswith(f"hq-gevent-{__version__}-"), proc.stdout
    return path


@pytest.fixture(scope="module")
def installed_root(rpm_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("rpmroot")
    db = ["--root", str(root), "--dbpath", "/var/lib/rpm"]
    run(["rpm", *db, "--initdb"])
    run(["rpm", *db, "-i", "--nodeps", "--noscripts", str(rpm_file)])
    return root


def rpm_query(rpm_file, *args):
    return run(["rpm", "-qp", *args, str(rpm_file)]).stdout


@pytest.mark.slow
def test_rpm_lists_every_file(rpm_file):
    files = set(rpm_query(rpm_file, "-l").splitlines())
    assert PACKAGED <= files, f"missing: {PACKAGED - files}"
    assert set(rpm_query(rpm_file, "--configfiles").splitlines()) == CONFIG_FILES
    # %config(noreplace): an edited config survives an upgrade (rpm writes the new one as .rpmnew).
    flags = dict(
        line.partition(" ")[::2]
        for line in rpm_query(rpm_file, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines()
    )
    for path in CONFIG_FILES:
        assert "c" in flags[path] and "n" in flags[path], (path, flags[path])
    # The token file is made on the target by %post, never shipped: no two hosts share a token.
    assert "g" in flags[TOKENS], flags[TOKENS]
    owners = {
        line.split()[0]: line.split()[1:]
        for line in rpm_query(
            rpm_file, "--qf", "[%{FILENAMES} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEMODES:perms}\n]"
        ).splitlines()
    }
    for path in ("/var/lib/hq-gevent", "/var/log/hq-gevent"):
        assert owners[path] == ["hq-gevent", "hq-gevent", "drwxr-x---"], (path, owners[path])
    assert owners["/etc/hq-gevent/hq-gevent.toml"][:2] == ["root", "root"]
    assert owners[TOKENS] == ["root", "hq-gevent", "-rw-r-----"], owners[TOKENS]
    # Nothing outside the venv and the files above.
    others = {f for f in files if not f.startswith(VENV + "/")} - PACKAGED - {VENV}
    assert others <= {"/etc/hq-gevent", "/usr/share/doc/hq-gevent", f"/usr/share/doc/hq-gevent-{__version__}",
                      f"/usr/share/doc/hq-gevent-{__version__}/README.md", "/usr/share/doc/hq-gevent/README.md"}, others


@pytest.mark.slow
def test_rpm_metadata_and_dependencies(rpm_file):
    version, release, arch = rpm_query(rpm_file, "--qf", "%{VERSION} %{RELEASE} %{ARCH}").split()
    assert version == __version__ and release.startswith("1") and arch == os.uname().machine
    requires = rpm_query(rpm_file, "--requires").splitlines()
    assert "python3.11" in requires
    # Bundled libraries are private: neither exported nor required from the system.
    assert not [r for r in requires if r.startswith(("python3.11dist", "python3dist", "python(abi)"))], requires
    provides = rpm_query(rpm_file, "--provides").split("\n")
    assert not [p for p in provides if "dist(" in p or ".so" in p], provides


@pytest.mark.slow
def test_rpm_scripts_create_the_user_and_drive_systemd(rpm_file):
    scripts = rpm_query(rpm_file, "--scripts")
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    assert "getent passwd hq-gevent" in pre and "useradd -r" in pre and "groupadd -r hq-gevent" in pre
    assert "-s /sbin/nologin" in pre and "-d /var/lib/hq-gevent" in pre
    post = scripts.split("postinstall scriptlet")[1].split("scriptlet")[0]
    # The API token: made only when the file is absent, from the OS's CSPRNG, 0640 root:hq-gevent.
    assert f'path = "{TOKENS}"' in post and "if not os.path.exists(path):" in post, post
    assert "secrets.token_urlsafe(32)" in post and "os.O_EXCL, 0o600)" in post
    assert 'os.fchown(fd, 0, grp.getgrnam("hq-gevent").gr_gid)' in post and "os.fchmod(fd, 0o640)" in post
    # Either the distribution's %systemd_* macros or the spec's fallbacks (Debian's rpm has none).
    assert re.search(r"preset .*hq-gevent\.service|install-system-units hq-gevent\.service", post), post
    preun = scripts.split("preuninstall scriptlet")[1]
    assert re.search(r"disable --now .*hq-gevent\.service|remove-system-units hq-gevent\.service", preun), preun
    postun = scripts.split("postuninstall scriptlet")[1]
    assert re.search(r"try-restart .*hq-gevent\.service|mark-restart-system-units hq-gevent\.service", postun), postun


@pytest.mark.slow
def test_rpmlint_is_clean_with_the_explained_waivers(rpm_file):
    require_tool("rpmlint", "linting the RPM")
    proc = subprocess.run(
        ["rpmlint", "-r", str(ROOT / "rpm" / "hq-gevent.rpmlintrc"), str(rpm_file)],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    # An unused waiver is an error too (unused-rpmlintrc-filter), so the list cannot go stale.
    assert proc.returncode == 0 and " 0 errors, 0 warnings" in out, out


@pytest.mark.slow
def test_installed_venv_uses_final_paths(installed_root, rpm_topdir):
    venv = installed_root / VENV.lstrip("/")
    build_dir = str(rpm_topdir)
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and os.access(script, os.X_OK):
            first = script.read_bytes().split(b"\n", 1)[0]
            assert first == f"#!{VENV}/bin/python".encode(), (script, first)
    assert os.readlink(venv / "bin" / "python3.11") == "/usr/bin/python3.11"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and build_dir not in cfg
    usr_bin = installed_root / "usr" / "bin" / "hq-gevent"
    assert usr_bin.resolve() == (venv / "bin" / "hq-gevent").resolve()
    # No file (scripts, activate, RECORD, .pyc source paths) names the build tree or the checkout.
    leaks = subprocess.run(["grep", "-rlF", "-e", build_dir, "-e", str(ROOT), str(venv)],
                           capture_output=True, text=True, timeout=60)
    assert leaks.returncode == 1, leaks.stdout
    pyc = next((venv / "lib").glob("python3.11/site-packages/hq_gevent/__pycache__/cli.*.pyc"))
    assert f"{VENV}/lib/python3.11/site-packages/hq_gevent/cli.py".encode() in pyc.read_bytes()


def packaged_command(root):
    """The packaged /usr/bin/hq-gevent of a scratch root, run by the packaged venv's interpreter."""
    return [str(root / VENV.lstrip("/") / "bin" / "python"), str(root / "usr" / "bin" / "hq-gevent")]


@pytest.mark.slow
def test_installed_version(installed_root):
    proc = run([*packaged_command(installed_root), "--version"], env=dict(os.environ, PYTHONPATH=""),
               cwd=str(installed_root))
    assert proc.stdout.strip() == f"hq-gevent {__version__}"
    # It is the venv's copy that runs, not the checkout's.
    where = run([str(installed_root / VENV.lstrip("/") / "bin" / "python"), "-c",
                 "import hq_gevent, gevent; print(hq_gevent.__file__); print(gevent.__file__)"],
                cwd=str(installed_root))
    for line in where.stdout.split():
        assert line.startswith(str(installed_root / VENV.lstrip("/") / "lib")), where.stdout


class PackagedServer(HQServer):
    """HQServer running the RPM's hq-gevent from a scratch root, with the packaged config re-rooted."""

    def __init__(self, root, tmp_path):
        self.root = root
        config = toml.load(root / "etc" / "hq-gevent" / "hq-gevent.toml")
        for key in PRODUCTION:
            config[key] = str(root / config[key].lstrip("/"))
        super().__init__(tmp_path, config, name="packaged")
        # Loopback on a free port (the packaged file says 0.0.0.0:19900), and a quick stop.
        self.config.update(addr=f"127.0.0.1:{self.port}", shutdown_timeout=5)
        # The token %post would make (this root is installed with --noscripts); the packaged config
        # requires it, so every request of the tests carries it.
        tokens = Path(self.config["auth_tokens_file"])
        if not tokens.exists():
            tokens.write_text("packaged-test-token-" + os.urandom(8).hex() + "\n")
        self.token = tokens.read_text().strip()
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if self.session.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def start(self, timeout=20, wait=True):
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HQ_"))}
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*packaged_command(self.root), "serve", "-c", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=str(self.root),
        )
        if wait:
            self.wait_ready(timeout)
        return self


@pytest.mark.slow
def test_installed_server_runs_a_job(installed_root, tmp_path, worker):
    srv = PackagedServer(installed_root, tmp_path)
    try:
        srv.start()
        # Secure by default: without the token the packaged config refuses the API.
        assert requests.get(srv.url + "/job", timeout=10).status_code == 401
        job = srv.push(url=worker.url + "/packaged", payload={"from": "rpm"})
        done = srv.wait_job(job["id"])
        assert done["status"] == "success", done
        assert worker.requests[0]["path"] == "/packaged"
        # The web UI's files (package data) made it into the venv.
        ui = srv.request("GET", "/ui/")
        assert ui.status_code == 200 and "<html" in ui.text.lower(), ui.text[:200]
        assert srv.stop() == 0, srv.log()
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.proc.kill()
    # The packaged config sent both logs to the (re-rooted) /var/log/hq-gevent files.
    logs = installed_root / "var" / "log" / "hq-gevent"
    assert "Listening on" in (logs / "hq-gevent.log").read_text()
    assert "/job" in (logs / "access.log").read_text()
    assert (installed_root / "var" / "lib" / "hq-gevent").iterdir()


@pytest.mark.slow
def test_packaged_unit_verifies_in_the_scratch_root(installed_root):
    """`systemd-analyze verify` checks that ExecStart's binary exists, which on this machine it does not
    (/usr/bin/hq-gevent is the package's): so the unit is verified with --root in the scratch root where
    the RPM is installed, after adding what a real system has there (the host's own units, for
    sysinit.target & co., and /bin/kill for ExecReload). ExecStart then resolves through the packaged
    /usr/bin/hq-gevent symlink to the venv's script, as on the target."""
    require_tool("systemd-analyze", "systemd unit checks")
    packaged_unit = installed_root / "usr" / "lib" / "systemd" / "system" / "hq-gevent.service"
    assert packaged_unit.read_text() == UNIT.read_text()
    root = installed_root
    units = root / "usr" / "lib" / "systemd" / "system"
    for unit in Path("/usr/lib/systemd/system").iterdir():
        target = units / unit.name
        if not target.exists() and not target.is_symlink():
            if unit.is_symlink():
                target.symlink_to(os.readlink(unit))
            elif unit.is_file():
                shutil.copy2(unit, target)
    kill = root / "bin" / "kill"
    if not kill.exists():
        kill.parent.mkdir(exist_ok=True)
        shutil.copy2(shutil.which("kill", path="/usr/bin:/bin"), kill)
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/usr/lib/systemd/system/hq-gevent.service"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


# --- the unit under a real systemd -----------------------------------------------------------------


class Container:
    """A real systemd (PID 1 of an nspawn container) booted from a throw-away overlay of this machine's
    own root: the mounts live in a private mount namespace, so nothing of it outlives the test. It
    shares the host's network, so the tests reach the service, and the service the worker app, on
    127.0.0.1. The RPM is bind-mounted read-only at /mnt/hq-gevent.rpm."""

    def __init__(self, workdir, rpm):
        script = (
            'set -e; mount -t tmpfs tmpfs "$1"; mkdir "$1/upper" "$1/work" "$1/root"; '
            'mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"; '
            'systemd-id128 new > "$1/root/etc/machine-id"; '
            # Nothing of this machine's own services and timers: the container shares its network.
            'ln -sf /dev/null "$1/root/etc/systemd/system/timers.target"; '
            'exec systemd-nspawn -q -D "$1/root" --register=no --keep-unit --link-journal=no --boot '
            '--console=pipe -M hq-gevent-test --bind-ro="$2:/mnt/hq-gevent.rpm" -- systemd.unit=basic.target'
        )
        self.log_path = workdir / "container.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(workdir), str(rpm)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            self.init_pid = self._wait_init()
            self._wait_booted()
        except BaseException:
            self.close()
            raise

    def log(self):
        return self.log_path.read_text(errors="replace")

    def _wait_init(self, timeout=30):
        """The container's PID 1 is the child of systemd-nspawn (which unshare's sh exec'd into)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"no systemd in the container after {timeout}s:\n{self.log()}")

    def _wait_booted(self, timeout=90):
        deadline = time.monotonic() + timeout
        while True:  # systemctl fails to connect until PID 1 has its socket up
            proc = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return
            if state or time.monotonic() > deadline:
                raise RuntimeError(f"container systemd is {state!r} ({proc.stderr.strip()}):\n{self.log()}")
            time.sleep(0.2)

    def run(self, *cmd, check=True, timeout=60):
        proc = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", *cmd],
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def close(self):
        if getattr(self, "init_pid", None) and self.proc.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=10)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn shuts the container down in order
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def container(rpm_file, tmp_path_factory):
    for tool in ("systemd-nspawn", "nsenter", "unshare", "logrotate"):
        require_tool(tool, "running the unit under a real systemd")
    if os.geteuid() != 0:
        pytest.skip("booting a systemd container needs root")
    box = Container(tmp_path_factory.mktemp("container"), rpm_file)
    yield box
    box.close()


@pytest.mark.slow
def test_service_under_systemd(container, worker):
    """Install the RPM with its scriptlets, start the unit with all its hardening, run a job, reload
    (SIGUSR1 reopens the logs), and stop (SIGTERM, exit 0 inside TimeoutStopSec)."""
    c = container
    install = c.run("rpm", "-i", "--nodeps", "/mnt/hq-gevent.rpm")
    assert "hq-gevent" in c.run("getent", "passwd", "hq-gevent").stdout  # %pre made the system user
    assert c.run("getent", "passwd", "hq-gevent").stdout.strip().endswith(":/sbin/nologin"), install
    assert c.run("systemctl", "cat", "hq-gevent.service").stdout.count("ExecStart=/usr/bin/hq-gevent") == 1
    # %post made the API token: one random line, readable by root and the service's group only.
    assert c.run("stat", "-c", "%U %G %a", TOKENS).stdout.split() == ["root", "hq-gevent", "640"]
    token = c.run("cat", TOKENS).stdout
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", token), "not one token_urlsafe(32) line"
    token = token.strip()
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    port = free_port()
    c.run("sed", "-i", f's/^addr = .*/addr = "127.0.0.1:{port}"/', "/etc/hq-gevent/hq-gevent.toml")
    c.run("systemctl", "start", "hq-gevent.service")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if api.get(url + "/", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            status = c.run("systemctl", "status", "--no-pager", "-l", "hq-gevent", check=False).stdout
            assert time.monotonic() < deadline and "code=exited" not in status and "failed" not in status, status
            time.sleep(0.2)
        # Secure by default: the service (user hq-gevent, group-readable token) requires the token...
        assert requests.get(url + "/job", timeout=5).status_code == 401
        # ...and the CLI run by root on the host finds it without flags.
        # (/usr/bin/hq-gevent: the packaged CLI, not one the host's PATH would find)
        assert '"numJobs"' in c.run("/usr/bin/hq-gevent", "stats", "-a", url).stdout
        r = api.post(url + "/job", json={"url": worker.url + "/under-systemd", "payload": {"n": 1}}, timeout=10)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 15
        while (job := api.get(f"{url}/job/{job_id}", timeout=5).json())["status"] not in ("success", "failure"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["status"] == "success", job
        assert worker.requests[0]["path"] == "/under-systemd"

        # The sandbox is in force on the running server: no capabilities, no_new_privs, a seccomp filter.
        pid = c.run("systemctl", "show", "-p", "MainPID", "--value", "hq-gevent.service").stdout.strip()
        status = dict(line.split(":\t", 1) for line in c.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                      if ":\t" in line)
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0, status
        exposure = c.run("systemd-analyze", "security", "--no-pager", "hq-gevent.service").stdout
        score = float(re.search(r"Overall exposure level for hq-gevent\.service: ([0-9.]+)", exposure).group(1))
        print(f"systemd-analyze security hq-gevent.service (running): {score}")
        assert score <= 1.5, exposure
        # The service runs as hq-gevent in its state directory; logs go to /var/log/hq-gevent.
        assert c.run("stat", "-c", "%U %a", "/var/lib/hq-gevent").stdout.split() == ["hq-gevent", "750"]
        assert "Listening on" in c.run("cat", "/var/log/hq-gevent/hq-gevent.log").stdout

        # The packaged logrotate rule: rotate (as hq-gevent), then `systemctl reload` = SIGUSR1, on
        # which the server reopens its logs, so new lines go to new files and none to the rotated ones.
        c.run("logrotate", "-f", "/etc/logrotate.d/hq-gevent")
        rotated = c.run("cat", "/var/log/hq-gevent/access.log.1").stdout
        assert "POST" in rotated and "/job" in rotated, rotated  # the push above
        assert "Listening on" in c.run("cat", "/var/log/hq-gevent/hq-gevent.log.1").stdout
        deadline = time.monotonic() + 10
        while "/job?after-rotate" not in c.run("cat", "/var/log/hq-gevent/access.log", check=False).stdout:
            api.get(url + "/job?after-rotate", timeout=5)
            assert time.monotonic() < deadline, "nothing in a new access.log after logrotate"
            time.sleep(0.2)
        assert "/job?after-rotate" not in c.run("cat", "/var/log/hq-gevent/access.log.1").stdout
    finally:
        started = time.monotonic()
        c.run("systemctl", "stop", "hq-gevent.service", check=False)
        stopped_in = time.monotonic() - started
    show = c.run("systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", "hq-gevent.service").stdout
    assert "Result=success" in show and "ExecMainStatus=0" in show, show + c.run(
        "journalctl", "-u", "hq-gevent", "--no-pager", check=False).stdout
    assert stopped_in < 15, stopped_in
    assert token not in c.run("cat", "/var/log/hq-gevent/access.log", "/var/log/hq-gevent/access.log.1",
                              "/var/log/hq-gevent/hq-gevent.log", "/var/log/hq-gevent/hq-gevent.log.1").stdout

    # An upgrade (here: the same package again) keeps the token, its owner and its mode, and
    # `rpm -V` finds nothing to report about it (the %ghost entry says what %post makes).
    c.run("rpm", "-U", "--replacepkgs", "--nodeps", "/mnt/hq-gevent.rpm")
    assert c.run("cat", TOKENS).stdout.strip() == token
    assert c.run("stat", "-c", "%U %G %a", TOKENS).stdout.split() == ["root", "hq-gevent", "640"]
    verify = c.run("rpm", "-V", "hq-gevent", check=False).stdout
    assert TOKENS not in verify, verify

    # Removal runs %preun/%postun cleanly; the edited config is kept as .rpmsave, the data stays.
    c.run("rpm", "-e", "hq-gevent")
    assert c.run("test", "-e", "/usr/bin/hq-gevent", check=False).returncode == 1
    # The token stays, as the data does: a reinstall serves the same clients again.
    assert c.run("cat", TOKENS).stdout.strip() == token
    assert c.run("test", "-f", "/etc/hq-gevent/hq-gevent.toml.rpmsave", check=False).returncode == 0
    assert "could not be found" in c.run("systemctl", "status", "hq-gevent.service", check=False).stderr
