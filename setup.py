import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "hq_gevent" / "__init__.py").read_text()).group(1)

POSTGRESQL = ["psycopg[binary,pool]>=3.2"]

setup(
    name="hq-gevent",
    version=version,
    description="A durable, language-agnostic HTTP job queue server on gevent (HQ-compatible)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["hq_gevent", "hq_gevent.*"]),
    include_package_data=True,
    package_data={"hq_gevent": ["ui/*", "ui/**/*"]},
    python_requires=">=3.11",
    install_requires=[
        # server.py adapts two pywsgi handler internals (header parsing, one-send responses),
        # checked against 23.9 and 26.9: a new major release must pass the tests first.
        "gevent>=23.9,<27",
        "bottle>=0.12.25",
        "requests>=2.28",
        "ujson>=5.7",
        "toml>=0.10.2",
        "zc.lockfile>=3.0",
        # Linear-time regular expressions for the name/term list filters (Go regexp's engine family).
        "google-re2>=1.1",
        # GET /metrics: the Prometheus exposition format, and the process_* collectors.
        "prometheus_client>=0.17",
    ],
    extras_require={
        # store = "postgresql" (SPEC §13): psycopg is imported only then. 3.2 for notifies(timeout=);
        # gevent cooperation is documented from 3.1.14 on.
        "postgresql": POSTGRESQL,
        "test": ["pytest>=7", "playwright>=1.40", "hypothesis>=6.80", "standardwebhooks>=1.0", *POSTGRESQL],
    },
    entry_points={"console_scripts": ["hq-gevent = hq_gevent.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: Bottle",
        "Operating System :: POSIX :: Linux",
    ],
)
