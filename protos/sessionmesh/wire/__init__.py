"""The wire contract beside the generated code: what both sides must agree on that the
``.proto`` files cannot say (metadata keys, error reasons, status codes and their encoding,
the Struct codec, session-id rules, channel limits, the etcd key layout). Client and server
import it; it imports neither, and runs nothing: tasks, loops and deadlines are the core's.
"""
