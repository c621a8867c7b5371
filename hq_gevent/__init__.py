"""hq-gevent: a durable HTTP job queue server on gevent, wire-compatible with HQ 1.x."""

__version__ = "0.2.0"
# Filled in by the RPM build (rpm/build.sh); empty for a source checkout.
__commit_hash__ = ""
