"""The quota ledger's place (not built yet).

The routing issue needs money reserved before a model call and settled after it, in
the database every worker shares (../shared/design.md, "Storage"): a reservation
row per message (msg_id, tenant or user tier, amount, expiry), settled with the
cost the usage row records, released when the call fails or the reservation
expires, and the spend per period that a routing rule checks against its quota.
Its repository (``QuotaLedger``) and its tables (quota reservations, spend, user
tiers) go here and into a migration of their own, over the shared ``Database``.
"""
