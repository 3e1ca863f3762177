"""How long the identifiers a callback carries may be: one table, checked at the gateway.

Everything the pipeline stores is derived from these (conversation ids, the reply's
row id, the fallback ledger id), and the database columns are sized with margin
above the longest derived value (a test holds the schema to it). The gateway
refuses a longer value with a 400 before anything reaches Kafka, so no write can
fail on a length after Easemob accepted a reply.
"""

from __future__ import annotations

from typing import Final

# Easemob's server message id is a decimal string of about 19 digits.
MSG_ID_MAX: Final = 64
# Easemob user ids (usernames) are at most 64 characters; group and chatroom ids are
# decimal strings far shorter. Bot ids come from the policy file and obey the same bound.
USER_ID_MAX: Final = 64
GROUP_ID_MAX: Final = 64
# ``{appkey}_{uuid}`` (or ``{appkey}_{msg_id}``); an app key is ``org#app``.
CALL_ID_MAX: Final = 256
# What the gateway writes into logs of a request it could not authenticate.
LOGGED_VALUE_MAX: Final = 64
