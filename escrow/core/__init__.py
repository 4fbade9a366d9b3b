"""What the escrow server, its CLI and the node agent share, and nothing else: the error
hierarchy, the wire protocol and its encoding, unlock keys and their shares, timestamps, TLS
contexts, systemd notification, PKCS#11 sessions and PIN sources, the plain text every
untrusted string is shown as, TOML settings files, files replaced atomically, P-256 public
keys and certificate subjects, the fleet's status as the escrow reports it, and this
release's version.

The agent imports from here and from no other part of ``escrow``; a module here imports
nothing outside ``escrow.core``.
"""
