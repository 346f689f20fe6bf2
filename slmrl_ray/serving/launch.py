"""`slmrl-ray serve`: start the application locally, on 127.0.0.1 unless told otherwise.

SOURCE is a Serve config file (its first application's `args` and its `http_options`),
or a registry.json / experiment folder / URI served with default arguments.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from slmrl_ray.config import ConfigError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def read_source(source: str) -> tuple[dict, dict]:
    """(application args, http options) for SOURCE."""
    path = Path(source).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
        applications = config.get("applications") or []
        if not applications or "args" not in applications[0]:
            raise ConfigError(f"{source}: expected a Serve config with applications[0].args")
        return dict(applications[0]["args"]), dict(config.get("http_options") or {})
    return {"registry": source}, {}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(source: str, host: str | None = None, port: int | None = None, api_key: str | None = None,
          insecure: bool = False) -> str:
    """Build and run the app in the connected (or a new local) Ray; returns its URL.

    Bound beyond loopback, the app needs an API key (`api_key`, $SLMRL_RAY_API_KEY or the
    config's `api_key`) unless `insecure` says to serve it open.
    """
    import ray
    from ray import serve

    from slmrl_ray.serving.app import build_app

    args, http = read_source(source)
    host = host or http.get("host") or DEFAULT_HOST
    port = port or http.get("port") or DEFAULT_PORT
    if api_key:
        args["api_key"] = api_key
    if not is_loopback(host) and not (args.get("api_key") or os.environ.get("SLMRL_RAY_API_KEY")) and not insecure:
        raise ConfigError(f"refusing to serve on {host} without an API key: pass --api-key (or set "
                          f"SLMRL_RAY_API_KEY), or --insecure to serve every model to anyone who can reach it")
    application = build_app(args)  # validates args and the catalog before Ray starts anything
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init(dashboard_host="127.0.0.1")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="slmrl", route_prefix="/")
    return f"http://{host}:{port}"


def serve_forever(source: str, host: str | None = None, port: int | None = None, api_key: str | None = None,
                  insecure: bool = False) -> None:
    url = start(source, host, port, api_key, insecure)
    print(f"slmrl-ray: serving on {url}  (models: {url}/v1/models; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


@contextmanager
def local_app(app_args: dict, port: int) -> Iterator[str]:
    """The app in a fresh local Ray (all CPUs, no dashboard) on 127.0.0.1:`port`, shut down on
    exit; yields its URL. For the serving benchmark (`slmrl_ray.bench.serve`)."""
    import ray
    from ray import serve

    from slmrl_ray.serving.app import build_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="slmrl", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
