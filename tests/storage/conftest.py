from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage.support import Outage
from tests.support.s3 import MotoS3


@pytest.fixture
def s3_outage(moto_s3: MotoS3, s3_bucket: str) -> Iterator[Outage]:
    """S3 can be stopped mid-test; it is back (with an empty bucket) after the test."""
    outage = Outage(moto_s3, s3_bucket)
    yield outage
    outage.end()
