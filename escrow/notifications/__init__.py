"""What the escrow tells people without being asked: events worth hearing of (a request waiting
for custodians, a decision, an expiry, an unlock, a refusal, a cloned or silent manager),
posted to the receivers of ``[[webhooks]]`` in escrow.toml, each body signed with the
receiver's own secret.

- :mod:`~escrow.notifications.events` (pure): the kinds of event, and each event's identity,
  the same on every replica;
- :mod:`~escrow.notifications.body` (pure): the JSON body and its chat ``text``, every value a
  node chose neutralised;
- :mod:`~escrow.notifications.signing` (pure): the signature header;
- :mod:`~escrow.notifications.settings` (pure): ``[[webhooks]]`` as read from escrow.toml;
- :mod:`~escrow.notifications.receivers`: each receiver with its secret, read from a file or
  a systemd credential;
- :mod:`~escrow.notifications.retry` (pure): what an answer means, and the back-off;
- :mod:`~escrow.notifications.delivery`: one event posted to one receiver, with retries.

The server's side (claiming each event once among replicas, the periodic check for expiries
and silent nodes, cancelling at stop) is escrow.server.notifier.
"""
