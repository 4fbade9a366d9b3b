"""The test laboratory: what the tests and the benchmarks run the real thing in.

An `escrow serve` process with its custodians and clusters (server), the escrow CLI run as an
operator would (commands), dockerd in network namespaces of its own and swarms of them
(dockerd, netlab), swarm-like certificates (certs), node agents and their environment (agent),
API calls as an agent makes them (api), webhook receivers (receiver), a booted Debian box for
the systemd units (box), and the process the crash tests kill (deposit_loop).

Both tests/ and bench/ import it; production code (escrow, agent) never does, and it is not
in the wheel.
"""
