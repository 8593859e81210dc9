"""Floe's SQLite database: conversations, messages, full-text search."""

from floe_app.store.db import Conversation, LedgerRow, Message, SearchHit, Store

__all__ = ["Conversation", "LedgerRow", "Message", "SearchHit", "Store"]
