from tests.webhooks.fixtures import receiver, webhooks_on

__all__ = ["receiver", "webhooks_on"]
