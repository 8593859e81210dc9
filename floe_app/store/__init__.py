"""Floe's SQLite database: conversations, messages, full-text search."""

from floe_app.store.db import Conversation, Message, SearchHit, Store

__all__ = ["Conversation", "Message", "SearchHit", "Store"]
