"""Ferry's shared core: what every service needs and nothing service-specific.

Rooms: ``errors`` (the exception tree and its gRPC codes), ``settings`` (one
settings object per service: flags > FERRY_* env > YAML > defaults), ``store``
(the model store layout and atomic writes), ``datatypes`` (the one datatype table),
``codec`` (v2 tensors <-> numpy), ``modelconfig`` (a model's serving signature and
policies from ``config.json``), ``validation`` (the checks a request meets against
it), ``configproto`` (the signature in protocol messages), ``warmup`` and ``classify``
(Triton's warm-up samples and classification extension), ``forming`` (the batch-forming
rule), ``grpcserver`` and ``interceptors`` (server plumbing: health, reflection, the
error interceptor, graceful stop), ``auth``, ``guard`` and ``security`` (keys, roles,
audit, TLS, protected mode), ``uploads``, ``lifetime``, ``cpus`` and ``telemetry``
(logs and metrics). Nothing here imports torch.
"""
