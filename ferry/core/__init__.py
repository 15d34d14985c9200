"""Ferry's shared core: what every service needs and nothing service-specific.

Rooms: ``errors`` (the exception tree and its gRPC codes), ``settings`` (one
settings object per service: flags > FERRY_* env > YAML > defaults), ``store``
(the model store layout and atomic writes), ``codec`` (v2 tensors <-> numpy),
``modelconfig`` (a model's serving signature and its validation), ``grpcserver``
(server plumbing: health, reflection, the error interceptor, graceful stop) and
``telemetry`` (logs and metrics). Nothing here imports torch.
"""
