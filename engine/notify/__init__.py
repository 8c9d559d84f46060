"""Approval events fanned out: live updates, webhooks, waiters."""
