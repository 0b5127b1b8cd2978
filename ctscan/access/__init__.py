"""Access: who may use the system and what they did. API keys and accounts (`keys_and_accounts`),
the admin credential's verifier (`admin_credential`) and the append-only audit trail
(`audit_trail`). Nothing here knows HTTP, TensorFlow, models or images: the services translate
refusals into HTTP errors, and this package imports only the core's foundation, settings and
storage (tests/core/test_layering.py)."""
