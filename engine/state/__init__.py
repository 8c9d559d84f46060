"""The state the decisions keep: rate-limit counters, approvals and the decision log.

Each module holds one kind of state with its stores side by side (in memory for one
process, SQLite for one machine, Redis or Redis Cluster for a fleet) and the helpers they
share: `ratelimit` (windows, the reservations a decision holds), `approvals` (grants bound
to one exact call), `decision_log` (every decision, queried by the operator).
"""
