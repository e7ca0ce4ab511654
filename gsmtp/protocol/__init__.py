"""Sans-I/O SMTP: bytes in, events and replies out. Standard library only."""
