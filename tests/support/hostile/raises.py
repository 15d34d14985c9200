"""Raises while being imported."""

from tests.support.hostile import mark

mark("raises")
raise RuntimeError("hostile module refuses to import")
