"""Webhooks: endpoints told of every lowering's final status, signed per Standard Webhooks.

    targets.py     which URLs may be sent to (SSRF), and the address a delivery is pinned to
    outbox.py      the events, written in the transaction of the status change (DB only)
    endpoints.py   the endpoints and their delivery log (the API's side)
    dispatcher.py  the thread that claims due deliveries, signs, sends, retries, disables

Only dispatcher.py imports the signing library; the job store imports only outbox.py.
"""
