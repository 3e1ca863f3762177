"""quota functions: a reservation and a settlement in one round trip on PostgreSQL

A call's reservation was a transaction of five round trips (BEGIN, one conditional
upsert per scope, the reservation row, COMMIT) and its settlement another five. Every
paid message makes both, so they were most of the model stage's database time. These
functions do the same statements, in the same order and under the same locks, inside
one ``SELECT`` (a statement is atomic): one round trip each.

``imbot_quota_reserve`` locks the scopes' counters in the order it is given (the
caller passes them sorted by code point, the order every other writer of the counters
uses), refuses with the 1-based position of the first scope whose limit the amount
would pass (nothing held), else holds the amount in every one of them and writes the
reservation row; 0.

``imbot_quota_settle`` closes a held reservation and moves its amount from reserved to
spent in its scopes (in code-point order); a reservation already expired gets its spend
added once. Nothing for a reservation already settled.

SQLite keeps the transaction (``storage.quota``): it has no functions, and its writes
are local calls, not round trips.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 23:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

RESERVE = """
CREATE OR REPLACE FUNCTION imbot_quota_reserve(
    p_keys text[], p_limit_tokens bigint[], p_limit_micros bigint[],
    p_tokens bigint, p_micros bigint, p_now timestamptz,
    p_id text, p_msg_id text, p_user_id text, p_tier text, p_model text,
    p_expires_at timestamptz, p_lease_id text
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    used_tokens bigint;
    used_micros bigint;
BEGIN
    -- A scope's first hold creates its row; existing rows are left alone (not locked).
    INSERT INTO quota_counters
        (key, spent_tokens, spent_micros, reserved_tokens, reserved_micros, updated_at)
    SELECT k, 0, 0, 0, 0, p_now FROM unnest(p_keys) AS k ORDER BY k COLLATE "C"
    ON CONFLICT (key) DO NOTHING;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        SELECT spent_tokens + reserved_tokens, spent_micros + reserved_micros
          INTO used_tokens, used_micros
          FROM quota_counters WHERE key = p_keys[i] FOR UPDATE;
        IF (p_limit_tokens[i] IS NOT NULL AND used_tokens + p_tokens > p_limit_tokens[i])
           OR (p_limit_micros[i] IS NOT NULL AND used_micros + p_micros > p_limit_micros[i])
        THEN
            RETURN i;
        END IF;
    END LOOP;
    UPDATE quota_counters
       SET reserved_tokens = reserved_tokens + p_tokens,
           reserved_micros = reserved_micros + p_micros,
           updated_at = p_now
     WHERE key = ANY (p_keys);
    INSERT INTO quota_reservations
        (id, msg_id, user_id, tier, model, keys, tokens, micros, state, created_at,
         expires_at, lease_id)
    VALUES (p_id, p_msg_id, p_user_id, p_tier, p_model, array_to_string(p_keys, E'\\n'),
            p_tokens, p_micros, 'held', p_now, p_expires_at, p_lease_id);
    RETURN 0;
END
$$
"""

SETTLE = """
CREATE OR REPLACE FUNCTION imbot_quota_settle(
    p_id text, p_spent_tokens bigint, p_spent_micros bigint, p_now timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    held_keys text;
    held_tokens bigint;
    held_micros bigint;
    k text;
BEGIN
    UPDATE quota_reservations
       SET state = 'settled', spent_tokens = p_spent_tokens,
           spent_micros = p_spent_micros, settled_at = p_now
     WHERE id = p_id AND state = 'held'
    RETURNING keys, tokens, micros INTO held_keys, held_tokens, held_micros;
    IF FOUND THEN
        FOR k IN SELECT x FROM unnest(string_to_array(held_keys, E'\\n')) AS x
                  WHERE x <> '' ORDER BY x COLLATE "C" LOOP
            UPDATE quota_counters
               SET reserved_tokens = reserved_tokens - held_tokens,
                   reserved_micros = reserved_micros - held_micros,
                   spent_tokens = spent_tokens + p_spent_tokens,
                   spent_micros = spent_micros + p_spent_micros,
                   updated_at = p_now
             WHERE key = k;
        END LOOP;
        RETURN;
    END IF;
    -- Expired meanwhile (its worker was thought dead): the amount went back; the spend
    -- is added once.
    UPDATE quota_reservations
       SET spent_tokens = p_spent_tokens, spent_micros = p_spent_micros, settled_at = p_now
     WHERE id = p_id AND state = 'expired' AND settled_at IS NULL
    RETURNING keys INTO held_keys;
    IF FOUND THEN
        FOR k IN SELECT x FROM unnest(string_to_array(held_keys, E'\\n')) AS x
                  WHERE x <> '' ORDER BY x COLLATE "C" LOOP
            UPDATE quota_counters
               SET spent_tokens = spent_tokens + p_spent_tokens,
                   spent_micros = spent_micros + p_spent_micros,
                   updated_at = p_now
             WHERE key = k;
        END LOOP;
    END IF;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(RESERVE)
    op.execute(SETTLE)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS imbot_quota_settle(text, bigint, bigint, timestamptz)")
    op.execute(
        "DROP FUNCTION IF EXISTS imbot_quota_reserve(text[], bigint[], bigint[], bigint,"
        " bigint, timestamptz, text, text, text, text, text, timestamptz, text)"
    )
