"""`recray serve RUN_DIR [--config serve.yaml]`: deploy a trained run folder on Ray Serve."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from recray.jobs import main_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?",
                        help="run folder written by `recray train` (optional when the config "
                             "lists variants)")
    parser.add_argument("--config", help="serve config YAML, e.g. configs/serve.yaml "
                                         "(defaults without one)")
    parser.add_argument("--address", help="a running Ray cluster (default: a local Ray on "
                                          "127.0.0.1)")
    parser.add_argument("--host", help="HTTP address to bind (config default 127.0.0.1); "
                                       "0.0.0.0 exposes the endpoint to the network")
    parser.add_argument("--port", type=int, help="HTTP port (config default 8000)")
    parser.add_argument("--detach", action="store_true",
                        help="deploy and exit, leaving the app on the cluster (Serve's controller "
                             "is detached; `recray submit serve` passes it)")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from recray.platform.run_folder import load_run_folder
    from recray.platform.serve import (
        HAPROXY_ENV,
        check_against_schema,
        check_same_schema,
        deploy,
        load_serve_config,
        write_serve_config_file,
    )

    cfg = load_serve_config(args.config, args.run_dir, host=args.host, port=args.port)
    # Every variant loads here first, so a bad folder fails in seconds, not inside a replica.
    schema = check_same_schema({v.name: load_run_folder(v.run_dir) for v in cfg.variants})
    check_against_schema(cfg, schema)
    config_file = write_serve_config_file(cfg, args.run_dir or cfg.variants[0].run_dir)
    if cfg.ingress == "haproxy":
        # read where Ray starts: a cluster given by --address must have been started with them
        os.environ.update(HAPROXY_ENV)
    # --address, or the cluster of the job this runs in (`recray submit serve` sets RAY_ADDRESS);
    # elsewhere a Ray of its own on 127.0.0.1, never a stranger's.
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="WARNING")
    url = deploy(cfg)
    print(f"serving {', '.join(v.name for v in cfg.variants)} at {url}/v1/rank "
          f"(docs {url}/docs); Serve config for `serve deploy`: {config_file}", flush=True)
    if args.detach:
        return 0
    # Ctrl-C or a TERM from a supervisor: take the app down (Serve's own shutdown) and leave.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
