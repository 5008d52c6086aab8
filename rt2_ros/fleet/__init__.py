"""Fleet serving: one backend hosted on Ray Serve (replicas, dynamic batching) behind rt2-serve's gRPC front.

``rt2-serve`` runs one model instance and answers one call at a time, so N robots share
1/latency actions per second. For a fleet, replicas and batching come from Ray Serve rather
than from code of ours:

* :mod:`rt2_ros.fleet.replica` — the Ray Serve deployment. Each replica builds the hosted backend
  exactly as rt2-serve does (``rt2_ros.serve.build_backend`` from the same params file) and
  answers through ``@serve.batch``: concurrent calls are collected for up to
  ``fleet.batch_wait_timeout_s`` or ``fleet.max_batch_size`` calls and answered by one
  :meth:`Backend.infer_batch` call (the ``local`` backend runs one batched ``generate``).
* :mod:`rt2_ros.fleet.front` — ``rt2-fleet-serve``: rt2-serve's own :class:`~rt2_ros.serve.PolicyServer`
  (TLS, bearer token, mTLS, per-client limits, protocol-version handling, message caps, health)
  with a backend, :class:`~rt2_ros.fleet.front.RayServeBackend`, that forwards each call to the
  deployment handle. Robots keep their ``grpc`` backend and protocol unchanged.

Why a thin front rather than Ray Serve's own gRPC proxy: Ray Serve 2.60's proxy takes a port and
servicer functions only (no TLS, no server credentials, no interceptors) and routes by an
``application`` metadata key the robots do not send, so the security rules and the protocol
handling would have to be written a second time. See docs/fleet.md.
"""
