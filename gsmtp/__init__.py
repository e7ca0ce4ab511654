"""gsmtp: a durable SMTP mail transfer agent on gevent with an SQLite spool."""

__version__ = "0.1.0"
