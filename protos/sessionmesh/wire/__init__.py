"""The wire contract beside the generated code: what both sides must agree on that the
``.proto`` files cannot say (metadata keys, error reasons, the Struct codec, the status
encoding, session-id rules, channel limits), and the one piece of grpc.aio mechanics both
sides need to stop cleanly (tasks.py). Client and server import it; it imports neither.
"""
