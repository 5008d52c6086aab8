"""``rt2-fleet-serve``: rt2-serve's gRPC front, with the model on Ray Serve (replicas, dynamic batching).

Run it where robots can reach it; point the robots' ``grpc`` backend at it exactly as at rt2-serve::

    rt2-fleet-serve --fleet-config config/fleet.yaml --backend local --params config/server.yaml \\
        --host 0.0.0.0 --tls-cert server.crt --tls-key server.key --token-file token.txt

Every rt2-serve flag applies unchanged (they are rt2-serve's own parser), plus ``--fleet-config``
(batching, replicas, autoscaling, which Ray cluster: :data:`FLEET_OPTIONS`). ``--workers`` bounds
the concurrent calls the front holds; each waits on Ray rather than on a model lock, so it is sized
to the fleet (default 64), not to the model.

The robots' traffic stays protobuf over (m)TLS up to the front; between the front and the
replicas Ray's own transport carries Python objects (pickled observations and replies), so the
Ray cluster must be a trusted, private network, as Ray's documentation requires.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import Backend, BackendConfigError, BackendError, BackendTimeout, backend_class
from rt2_ros.backends.base import describe_exception, resolve_options
from rt2_ros.params import ConfigError, ParamSpec, flatten, resolve

_log = logging.getLogger("rt2_ros.fleet")

INSTALL_HINT = "pip install -r requirements-fleet.txt"
DEFAULT_WORKERS = 64  # front threads = concurrent calls held; each only waits on a Ray handle

FLEET_OPTIONS: tuple[ParamSpec, ...] = (
    ParamSpec("fleet.ray.address", "string", "",
              "Ray cluster to use: '' = start a local Ray instance in this process (stopped with it); 'auto' = the "
              "cluster this machine joined with `ray start`; 'ray://HEAD:10001' = a remote cluster via Ray Client."),
    ParamSpec("fleet.ray.num_cpus", "int", 0,
              "CPUs the local Ray instance may use (only with an empty address); 0 = all of this machine's.",
              low=0, high=4096),
    ParamSpec("fleet.ray.namespace", "string", "rt2_fleet", "Ray namespace of the application."),
    ParamSpec("fleet.app_name", "string", "rt2_fleet",
              "Ray Serve application name; two fronts on one cluster need different names."),
    ParamSpec("fleet.max_batch_size", "int", 16,
              "Most observations answered by one forward pass (@serve.batch max_batch_size).", low=1, high=1024),
    ParamSpec("fleet.batch_wait_timeout_s", "double", 0.005,
              "Longest a call waits for others to join its batch (@serve.batch batch_wait_timeout_s).", "s",
              0.0, 1.0),
    ParamSpec("fleet.num_replicas", "int", 1,
              "Model instances (fixed count; ignored when fleet.autoscaling.max_replicas > 0).", low=1, high=1024),
    ParamSpec("fleet.autoscaling.max_replicas", "int", 0,
              "Autoscaling upper bound; 0 = no autoscaling (fleet.num_replicas replicas).", low=0, high=1024),
    ParamSpec("fleet.autoscaling.min_replicas", "int", 1, "Autoscaling lower bound.", low=0, high=1024),
    ParamSpec("fleet.autoscaling.target_ongoing_requests", "double", 16.0,
              "Calls in flight per replica that autoscaling aims for (about one full batch).", low=0.1, high=10000.0),
    ParamSpec("fleet.max_ongoing_requests", "int", 0,
              "Calls one replica accepts at once before Ray queues them at the front; 0 = 4 x fleet.max_batch_size.",
              low=0, high=100000),
    ParamSpec("fleet.replica.num_cpus", "double", 1.0, "CPUs reserved for each replica.", low=0.0, high=1024.0),
    ParamSpec("fleet.replica.num_gpus", "double", 0.0,
              "GPUs reserved for each replica (e.g. 1, or 0.5 to pack two small models on a GPU).",
              low=0.0, high=64.0),
)


def load_fleet_config(path: str | Path | None) -> dict[str, Any]:
    """The validated flat ``fleet.*`` options of YAML file ``path`` (None: the defaults); ConfigError
    naming the file and key otherwise."""
    if path is None:
        return resolve(FLEET_OPTIONS, {})
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--fleet-config: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--fleet-config: {str(path)!r} is not valid YAML ({exc})") from None
    if not isinstance(tree, Mapping) or set(tree) != {"fleet"} or not isinstance(tree["fleet"], Mapping):
        raise ConfigError(f"--fleet-config: {str(path)!r} must hold one mapping, 'fleet:'")
    try:
        config = resolve(FLEET_OPTIONS, flatten(tree))
    except ConfigError as exc:
        raise ConfigError(f"--fleet-config {path}: {exc}") from None
    auto = config["fleet.autoscaling.max_replicas"]
    if auto and config["fleet.autoscaling.min_replicas"] > auto:
        raise ConfigError(f"--fleet-config {path}: fleet.autoscaling.min_replicas "
                          f"({config['fleet.autoscaling.min_replicas']}) exceeds fleet.autoscaling.max_replicas "
                          f"({auto})")
    return config


def deployment_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Serve deployment options from the flat fleet config."""
    batch = config["fleet.max_batch_size"]
    options: dict[str, Any] = {
        "max_ongoing_requests": config["fleet.max_ongoing_requests"] or 4 * batch,
        "ray_actor_options": {"num_cpus": config["fleet.replica.num_cpus"],
                              "num_gpus": config["fleet.replica.num_gpus"]},
    }
    if config["fleet.autoscaling.max_replicas"]:
        options["autoscaling_config"] = {
            "min_replicas": config["fleet.autoscaling.min_replicas"],
            "max_replicas": config["fleet.autoscaling.max_replicas"],
            "target_ongoing_requests": config["fleet.autoscaling.target_ongoing_requests"]}
    else:
        options["num_replicas"] = config["fleet.num_replicas"]
    return options


def check_hosted_options(params: Mapping[str, Any], backend_type: str | None, backend_cls: str | None) -> None:
    """The hosted backend's option checks, run here before deploying, so a bad key fails at once with its
    name instead of as a replica that Ray restarts over and over. (A --backend-class is checked on the replica.)"""
    if backend_cls is not None or backend_type is None:
        return
    cls = backend_class(backend_type)
    prefix = f"backend.{backend_type}."
    options = resolve_options(cls.OPTIONS, prefix, {k[len(prefix):]: v for k, v in params.items()
                                                    if k.startswith(prefix)})
    cls.check_options(options)


class RayServeBackend(Backend):
    """Forwards each call to the Ray Serve deployment that hosts the model (see :mod:`rt2_ros.fleet`)."""

    name = "ray_serve"
    #: PolicyServer need not serialise calls: the replicas take concurrent calls and batch them.
    concurrent_safe = True

    def __init__(self, handle: Any, tokenizer: Any, *, model_name: str = "", owns_ray: bool = False,
                 app_name: str = "") -> None:
        super().__init__({}, tokenizer)
        self._handle = handle
        self.model_name = model_name
        self._owns_ray = owns_ray
        self._app_name = app_name
        self._closed = threading.Event()

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        if not timeout_s > 0:
            raise BackendTimeout(f"ray_serve: no time budget left ({timeout_s:.3f} s)")
        if self._closed.is_set():
            raise BackendError("ray_serve: the fleet front is shutting down")
        response = self._handle.infer.remote(observation, timeout_s)
        try:
            result = response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            raise BackendTimeout(f"ray_serve: no answer from the deployment within {timeout_s:.3f} s") from None
        except Exception as exc:  # Ray's own failures: replica died, deployment gone, cluster unreachable
            raise BackendError(f"ray_serve: {type(exc).__name__}: {describe_exception(exc)}") from None
        if isinstance(result, BackendError):
            raise result
        return result

    def batch_sizes(self, timeout_s: float = 10.0) -> Counter[int]:
        """Batch size -> batches run, as counted by the replica that answers this call (one replica:
        all of them)."""
        return Counter(self._handle.batch_sizes.remote().result(timeout_s=timeout_s))

    def reset(self) -> None:
        """Nothing: one hosted model serves many robots, so it cannot hold one robot's episode state."""

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        from ray import serve

        try:
            if self._owns_ray:
                serve.shutdown()
            elif self._app_name:
                serve.delete(self._app_name)
        finally:
            if self._owns_ray:
                import ray

                ray.shutdown()


def start_fleet(params: Mapping[str, Any], backend_type: str | None, backend_cls: str | None,
                fleet: Mapping[str, Any], tokenizer: Any) -> RayServeBackend:
    """Deploy the hosted backend on Ray Serve (starting a local Ray instance if ``fleet.ray.address`` is
    empty) and return the front's backend. ImportError without ray[serve]; RuntimeError if Ray or the
    deployment fails (the message says why)."""
    import ray
    from ray import serve

    from rt2_ros.fleet.replica import BatchingReplica

    owns_ray = False
    if not ray.is_initialized():
        address = fleet["fleet.ray.address"] or None
        kwargs: dict[str, Any] = {"namespace": fleet["fleet.ray.namespace"], "include_dashboard": False,
                                  "logging_level": logging.WARNING}
        if address is None and fleet["fleet.ray.num_cpus"]:
            kwargs["num_cpus"] = fleet["fleet.ray.num_cpus"]
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise RuntimeError(f"cannot start or reach Ray (fleet.ray.address={fleet['fleet.ray.address']!r}): "
                               f"{type(exc).__name__}: {describe_exception(exc)}") from None
        owns_ray = address is None
    try:
        serve.start(proxy_location="Disabled")  # robots come through our front; no Ray HTTP/gRPC proxies
        deployment = serve.deployment(BatchingReplica, name="rt2_policy", **deployment_options(fleet))
        app = deployment.bind(dict(params), backend_type, backend_cls, fleet["fleet.max_batch_size"],
                              fleet["fleet.batch_wait_timeout_s"])
        handle = serve.run(app, name=fleet["fleet.app_name"], route_prefix=None)
    except Exception as exc:
        if owns_ray:
            ray.shutdown()
        raise RuntimeError(f"Ray Serve could not deploy the backend: {type(exc).__name__}: "
                           f"{describe_exception(exc)}") from None
    prefix = f"backend.{backend_type}."
    opts = {k[len(prefix):]: v for k, v in params.items() if backend_type and k.startswith(prefix)}
    model = str(next((opts[k] for k in ("model", "model_id", "model_path") if opts.get(k)), ""))
    return RayServeBackend(handle, tokenizer, model_name=model, owns_ray=owns_ray, app_name=fleet["fleet.app_name"])


# -- CLI --------------------------------------------------------------------------------------------


def _parser() -> Any:
    from rt2_ros import serve as rt2_serve

    p = rt2_serve.build_parser()  # every rt2-serve flag, with the same names, checks and help
    p.prog = "rt2-fleet-serve"
    p.description = ("Serve a VLA backend to many robots: rt2-serve's gRPC front (same flags, TLS and token "
                     "rules), the model on Ray Serve with replicas and dynamic batching (see docs/fleet.md).")
    p.add_argument("--fleet-config", metavar="YAML",
                   help="fleet.* options: batching, replicas/autoscaling, Ray address (e.g. config/fleet.yaml; "
                        "default: the built-in defaults, a local Ray instance)")
    p.set_defaults(workers=DEFAULT_WORKERS)
    return p


def main(argv: list[str] | None = None) -> int:
    from rt2_ros import serve as rt2_serve
    from rt2_ros.tokens import ActionTokenizer

    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = rt2_serve.config_from_args(args)
        fleet = load_fleet_config(args.fleet_config)
        flat = rt2_serve.load_params(args.params, args.node)
        backend_type = args.backend
        if backend_type is None and args.backend_class is None:
            backend_type = flat.get("backend.type")
            if backend_type in (None, "grpc"):
                raise ConfigError("--backend is required (the params file does not name a local backend.type)")
        check_hosted_options(flat, backend_type, args.backend_class)
        tokenizer = ActionTokenizer.from_config({k: v for k, v in flat.items() if k.startswith("tokenizer.")})
    except (ConfigError, BackendConfigError, ValueError) as exc:
        print(f"rt2-fleet-serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        backend = start_fleet(flat, backend_type, args.backend_class, fleet, tokenizer)
    except ImportError as exc:
        print(f"rt2-fleet-serve: error: Ray Serve is not installed ({exc.name or exc}): {INSTALL_HINT}",
              file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"rt2-fleet-serve: error: {exc}", file=sys.stderr)
        return 1
    name = backend_type or args.backend_class
    try:
        server = rt2_serve.PolicyServer(backend, name, tokenizer, config)
    except OSError as exc:
        backend.close()
        print(f"rt2-fleet-serve: error: {exc}", file=sys.stderr)
        return 1
    replicas = (f"{fleet['fleet.autoscaling.min_replicas']}-{fleet['fleet.autoscaling.max_replicas']} replicas"
                if fleet["fleet.autoscaling.max_replicas"] else f"{fleet['fleet.num_replicas']} replica(s)")
    rt2_serve.serve_until_signalled(server, "rt2-fleet-serve", insecure_flag=args.insecure, detail=(
        f" via Ray Serve, {replicas}, batches of up to {fleet['fleet.max_batch_size']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
