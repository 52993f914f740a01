"""The real IMAP servers the suite runs against: the Dovecot fixture everywhere, and
Cyrus besides it for the tests marked `on_both_servers` (first sync, new mail, a
UIDVALIDITY change, push, exactly once, change tracking, special-use folders)."""

from __future__ import annotations

import pytest

from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot

RealServer = Dovecot | Cyrus

# The `mail_server` fixture (tests/conftest.py) is the Dovecot fixture unless a test
# carries this mark; `mail_user` and `mail_account` live on `mail_server`.
on_both_servers = pytest.mark.parametrize("mail_server", ["dovecot", "cyrus"], indirect=True)
