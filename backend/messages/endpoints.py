"""Messages: list an account's messages, read one, download its raw bytes or an attachment."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from backend.deps import AdminDep, After, KnownQueryDep, SessionDep
from backend.errors import error_responses
from backend.mailbox.parser import displayable
from backend.messages import service
from backend.messages.schemas import MessageList, MessageRead, MessageSummary

router = APIRouter(
    tags=["messages"], dependencies=[AdminDep, KnownQueryDep], responses=error_responses(401, 404)
)

AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
MessageId = Annotated[int, Path(ge=1, le=2**63 - 1)]
AttachmentId = Annotated[int, Path(ge=1, le=2**63 - 1)]
Limit = Annotated[int, Query(ge=1, le=500, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many items")]

_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ ()+-]")


@router.get("/accounts/{account_id}/messages")
def list_messages(
    account_id: AccountId,
    session: SessionDep,
    *,
    limit: Limit = 50,
    offset: Offset = 0,
    after: After = None,
    quarantined: Annotated[
        bool,
        Query(description="only the quarantined ones: processing failed too often, set aside"),
    ] = False,
) -> MessageList:
    """The account's messages, newest first."""
    page = service.list_messages(
        session, account_id, limit=limit, offset=offset, after=after, quarantined=quarantined
    )
    return MessageList(
        items=[MessageSummary.model_validate(m) for m in page.items],
        total=page.total,
        next_after=page.next_after,
    )


@router.get("/messages/{message_id}")
def get_message(message_id: MessageId, session: SessionDep) -> MessageRead:
    """One message's metadata, with its attachments."""
    return MessageRead.model_validate(service.get_message(session, message_id))


@router.get(
    "/messages/{message_id}/raw",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"message/rfc822": {}}, "description": "the raw message"},
        **error_responses(503),
    },
)
def get_raw(message_id: MessageId, session: SessionDep) -> StreamingResponse:
    """The raw RFC 822 bytes, exactly as stored."""
    message = service.get_message(session, message_id)
    chunks = service.raw_chunks(message)
    return StreamingResponse(
        chunks,
        media_type="message/rfc822",
        headers=_download_headers(f"message-{message.id}.eml", None),
    )


@router.get(
    "/messages/{message_id}/attachments/{attachment_id}",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the file, with the content type it was sent with",
        },
        **error_responses(503),
    },
)
def get_attachment(
    message_id: MessageId, attachment_id: AttachmentId, session: SessionDep
) -> StreamingResponse:
    """Download one attachment (always as a download, never shown inline)."""
    attachment = service.get_attachment(session, message_id, attachment_id)
    chunks = service.open_chunks(
        attachment.storage_backend, attachment.storage_key, f"attachment {attachment.id}"
    )
    content_type = attachment.content_type.strip().lower()
    if not _CONTENT_TYPE.match(content_type):
        content_type = "application/octet-stream"
    return StreamingResponse(
        chunks,
        media_type=content_type,
        headers=_download_headers(attachment.safe_name, attachment.filename),
    )


def _download_headers(safe_name: str, original: str | None) -> dict[str, str]:
    """A Content-Disposition no file name can break out of: a plain ASCII name, and the
    sender's name percent-encoded (RFC 6266 filename*) for clients that show it."""
    ascii_name = _UNSAFE_FILENAME.sub("_", safe_name).strip(" .") or "download"
    disposition = f'attachment; filename="{ascii_name[:150]}"'
    if original:
        # "replace": names decoded from broken mail headers may hold lone surrogates.
        encoded = displayable(original)[:150].encode("utf-8", "replace")
        disposition += f"; filename*=UTF-8''{quote(encoded, safe='')}"
    return {"Content-Disposition": disposition, "X-Content-Type-Options": "nosniff"}
