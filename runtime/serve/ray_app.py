"""The same app on Ray Serve: ``python -m runtime.serve --ray --replicas N``.

Each replica is one process with its own model and batching engine; Ray's HTTP proxy spreads
requests over them. ``num_gpus`` is 1 per replica for a GPU backend. On a multi-machine Ray
cluster (KubeRay), pass ``--ray-address auto`` from a node of the cluster (docs/serving.md).
"""

from __future__ import annotations

import sys
import time

from runtime.serve.app import ServerConfig, create_app


def deployment(config: ServerConfig, replicas: int):
    """A Ray Serve deployment of the FastAPI app, loading the model in each replica."""
    from ray import serve

    app = create_app(config, load=False)
    gpu = config.backend != "ort-cpu"

    @serve.deployment(name="dsvl", num_replicas=replicas,
                      ray_actor_options={"num_cpus": max(config.threads, 1), "num_gpus": 1 if gpu else 0},
                      max_ongoing_requests=config.max_batch + config.max_queue)
    @serve.ingress(app)
    class DsvlServer:
        def __init__(self):
            app.state.dsvl.load()
            if app.state.dsvl.load_error:
                raise RuntimeError(app.state.dsvl.load_error)

        def __del__(self):
            app.state.dsvl.close()

    return DsvlServer


def run_ray(config: ServerConfig, replicas: int, host: str, port: int, address: str | None) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --ray needs Ray Serve: pip install -e \".[ray]\"", file=sys.stderr)
        return 2
    config.artifacts = config.artifacts.resolve()  # replicas may start in another directory
    if config.images.local_root is not None:
        config.images.local_root = config.images.local_root.resolve()
    if address:  # an existing cluster (KubeRay: "auto" on a cluster node)
        ray.init(address=address, log_to_driver=False)
    else:  # a local one, on loopback only
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 num_cpus=max(replicas * max(config.threads, 1), 1))
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(config, replicas).bind(), name="dsvl", route_prefix="/")
    print(f"serving {config.name} on http://{host}:{port}/v1 with {replicas} Ray Serve replica(s)",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        return 0
