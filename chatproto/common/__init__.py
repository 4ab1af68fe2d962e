"""
Small helpers shared by the chat server and the balancer: one Redis URL
parser (L{redisurl}), one ini + command line merge (L{options}), one reader
of the chat servers' registry in Redis (L{registry}), one open-files limit
helper (L{rlimits}), one public reader of endpoint-string arguments
(L{endpointstr}), the Redis Sentinel master lookup (L{sentinel}) and
SIGTERM/SIGINT handlers that never log (L{stopsignals}).

Nothing here imports the rest of C{chatproto}: the balancer depends on this
package and on nothing else of the chat server.
"""
