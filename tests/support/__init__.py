"""Real services for tests and benchmarks: Dovecot, PostgreSQL, Redis, moto S3."""
