"""`hq-gevent` command line: `serve` runs the server; the other commands talk to one."""
import argparse
import os
import sys

from hq_gevent import __version__


def build_parser():
    parser = argparse.ArgumentParser(prog="hq-gevent", description="A durable HTTP job queue server (HQ-compatible).")
    parser.add_argument("-v", "--version", action="version", version=f"hq-gevent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("-c", "--config-file", default=os.environ.get("HQ_CONFIG"), help="TOML config file (env HQ_CONFIG)")
    serve.add_argument("-l", "--log-level", default=os.environ.get("HQ_LOG_LEVEL"), help="debug|info|warn|error (env HQ_LOG_LEVEL)")
    serve.set_defaults(func=run_serve)
    return parser


def run_serve(args):
    from hq_gevent.server import serve

    return serve(config_file=args.config_file, log_level=args.log_level)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
