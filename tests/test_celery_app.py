"""The Celery app's broker: kombu's Sentinel transport, with mailbeat's guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu.common import ignore_errors
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from backend import redis
from backend.celery_app import SentinelTransport
from tests.support.sentinel import MASTER_NAME, running_sentinels


def test_a_broker_channel_closed_after_its_connection_does_not_end_the_worker(
    tmp_path: Path,
) -> None:
    """What a worker does when the master dies: it lets the connection go, then closes
    the channel holding an unacknowledged task. Kombu's own Sentinel channel raised an
    AttributeError there, which ended the worker; ours raises a connection error, which
    the worker ignores before reconnecting."""
    with running_sentinels(tmp_path) as sentinels:
        connection = Connection(sentinels.url, transport_options={"master_name": MASTER_NAME})
        assert isinstance(connection.transport, SentinelTransport)
        channel = connection.default_channel
        queue = Queue("held", Exchange("held"), "held")(channel)
        queue.declare()
        connection.Producer().publish({"task": 1}, exchange="held", routing_key="held")
        assert queue.get(no_ack=False) is not None  # delivered, not acknowledged
        connection.transport.client = None  # as kombu leaves it once it lets go
        with pytest.raises(redis.RedisConnectionError):
            channel.close()
        ignore_errors(connection, connection.close)  # the worker's call: no AttributeError
        # The task waits in Redis for the visibility timeout to put it back in its queue.
        assert len(sentinels.master.client().hkeys("unacked")) == 1
