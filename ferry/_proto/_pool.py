"""Ferry's descriptor pool, kept apart from the default one (see tools/gen_protos.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
