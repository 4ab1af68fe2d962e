"""
Small helpers shared by the chat server and the balancer: one Redis URL
parser (L{redisurl}), one ini + command line merge (L{options}), one reader
of the chat servers' registry in Redis (L{registry}) and one open-files
limit helper (L{rlimits}).

Nothing here imports the rest of C{chatproto}: the balancer depends on this
package and on nothing else of the chat server.
"""
