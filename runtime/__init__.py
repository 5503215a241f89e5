"""The threads that move a command along, one file each, in the order a message passes them:

listener -> inbox -> intake (commands row) -> queue -> workers -> handler -> outbox row
-> flusher -> PUBLISH; beside them heartbeat, watchdog, stream (optional) and recovery (at start).
"""
