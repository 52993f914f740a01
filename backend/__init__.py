"""mailbeat: IMAP ingestion at scale."""
