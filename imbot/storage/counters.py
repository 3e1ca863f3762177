"""The one statement that holds money in a budget's counter (``quota_counters``).

Used by a call's own scopes (``storage.quota``) and by a budget lease's slice
(``storage.leases``), so both keep one rule: ``spent + reserved + x <= limit``, checked
and applied in the same statement. A scope's first hold creates its row (the caller has
already refused an amount larger than the whole limit); later ones update it under the
condition, which PostgreSQL evaluates on the locked, latest row, so concurrent holds
cannot all pass it. Its row count is 1 when held, 0 when the limit refused it.
"""

from __future__ import annotations

from imbot.storage.database import sql

RESERVE = sql(
    "INSERT INTO quota_counters (key, spent_tokens, spent_micros, reserved_tokens,"
    " reserved_micros, updated_at) VALUES (:key, 0, 0, :tokens, :micros, :now)"
    " ON CONFLICT (key) DO UPDATE SET"
    " reserved_tokens = quota_counters.reserved_tokens + excluded.reserved_tokens,"
    " reserved_micros = quota_counters.reserved_micros + excluded.reserved_micros,"
    " updated_at = excluded.updated_at"
    " WHERE (CAST(:limit_tokens AS BIGINT) IS NULL OR quota_counters.spent_tokens"
    " + quota_counters.reserved_tokens + excluded.reserved_tokens <= :limit_tokens)"
    " AND (CAST(:limit_micros AS BIGINT) IS NULL OR quota_counters.spent_micros"
    " + quota_counters.reserved_micros + excluded.reserved_micros <= :limit_micros)"
)
