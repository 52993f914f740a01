from tests.mailbox.conftest import make_account

__all__ = ["make_account"]
