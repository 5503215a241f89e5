"""How the agent lives under systemd and is watched: sd_notify, metrics, the health snapshot
they read, the log format and the audit trail."""
