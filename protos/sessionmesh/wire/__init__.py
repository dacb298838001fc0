"""The wire contract beside the generated code: what both sides must agree on that the
``.proto`` files cannot say (metadata keys, error reasons, the Struct codec, the status
encoding, session-id rules, channel limits), and the asyncio mechanics both sides need:
stopping a task inside a grpc.aio call (tasks.py), writing to a shared stream without
awaiting the write, in batches under load (outbox.py). Client and server import it; it
imports neither.
"""
