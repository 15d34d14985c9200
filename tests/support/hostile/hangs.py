"""Never finishes importing."""

import time

from tests.support.hostile import mark

mark("hangs")
while True:
    time.sleep(1)
