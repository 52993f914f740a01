from tests.mailbox.conftest import make_account
from tests.webhooks.fixtures import receiver, webhooks_on

__all__ = ["make_account", "receiver", "webhooks_on"]
